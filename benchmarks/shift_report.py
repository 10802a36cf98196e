"""Markdown tables from a benchmarks/shift.py JSON document (the tables of docs/results.md).

    .venv/bin/python benchmarks/shift_report.py shift.json [--split test|val] [--arms fedavg-eps3,...]

One table per split: a row per recipe and arm, the clean AUC (mean over repeats; the 95% bootstrap
interval of the first repeat) and each condition's change against clean (mean over repeats; with
``--intervals`` the paired 95% interval of the first repeat), the worst change, and for the
leave-one-hospital-out arms the AUC on every image of the hospital left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _short(name: str) -> str:
    return name.replace("-", " ")


def table(doc: dict[str, Any], split: str, arms: list[str] | None, intervals: bool) -> str:
    conditions = [c["name"] for c in doc["conditions"] if c["name"] != "clean"]
    head = ["recipe", "arm", "runs", "clean AUC [95% CI]", *[_short(c) for c in conditions], "worst"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe, by_arm in doc["recipes"].items():
        for arm, entry in by_arm.items():
            if arms and arm not in arms:
                continue
            runs, mean = entry["runs"], entry["mean"]
            if split not in mean:
                continue
            first = runs[0][split]
            ci = first["clean"].get("ci")
            clean = f"{mean[split]['clean']['auc']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            cells = []
            for c in conditions:
                cell = f"{mean[split][c]['delta']:+.4f}"
                if intervals and "delta_ci" in first[c]:
                    lo, hi = first[c]["delta_ci"]
                    cell += f" [{lo:+.3f}, {hi:+.3f}]"
                cells.append(cell)
            lines.append(f"| {recipe} | {arm} | {len(runs)} | {clean} | " + " | ".join(cells)
                         + f" | {mean[split]['worst_delta']:+.4f} |")
    return "\n".join(lines)


def loho_table(doc: dict[str, Any]) -> str:
    lines = ["| recipe | hospital left out | images | AUC on its images (mean over runs) | 95% CI (first run) |",
             "|---|---|---|---|---|"]
    for recipe, by_arm in doc["recipes"].items():
        for arm, entry in by_arm.items():
            if not arm.startswith("loho-"):
                continue
            first = entry["runs"][0]["left_out"]
            lines.append(f"| {recipe} | {first['site']} | {first['images']} | {entry['mean']['auc']:.4f} | "
                         f"[{first['ci'][0]:.3f}, {first['ci'][1]:.3f}] |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--arms", default="", help="comma-separated arms to show (default: all)")
    p.add_argument("--intervals", action="store_true", help="show the paired interval of every change")
    args = p.parse_args()
    with open(args.json) as fh:
        doc = json.load(fh)
    arms = [a for a in args.arms.split(",") if a] or None
    print(table(doc, args.split, arms, args.intervals))
    if any(a.startswith("loho-") for r in doc["recipes"].values() for a in r) and (not arms or any(
            a.startswith("loho") for a in arms)):
        print()
        print(loho_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
