"""`fl-client status`: the site's own view of its privacy budget, from its ledger alone (interface 6, docs/interfaces.md).

A privacy officer reads here, without the coordinator and without training anything: how much
any patient of this site has been exposed to (``spent_epsilon``: the largest cumulative epsilon
over all runs, training and evaluation), the site's limit, and every charge with the numbers
needed to recompute its epsilon with Opacus alone (noise multiplier, sample rate, steps, delta,
accountant). Refusals are listed too, and the run policy the site approved (``fl-client approve
--policy``, client/run_policy.py). Nothing here names a patient or a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.site_home import SITE_HOME_HINT


class StatusError(ValueError):
    """The state dir has no readable ledger; the message says where it looked."""


def ledger_status(state_dir: str | Path) -> dict[str, Any]:
    """The status document: spent_epsilon, max_epsilon, delta, groups, runs, entries, refusals."""
    state = Path(state_dir)
    if not state.is_dir():
        raise StatusError(f"{state} is not a folder: give the site's state dir (fl-client start --state-dir)")
    from client.ledger import LEDGER_FILENAME, PrivacyLedger  # deferred: opacus; a wrong folder answers at once

    path = state / LEDGER_FILENAME
    policy = run_policy(state)
    if not path.exists():
        # Never "nothing spent" for a folder without a ledger: a mistyped path would tell a privacy officer so.
        raise StatusError(missing_ledger_message(state, LEDGER_FILENAME))
    try:
        doc = json.loads(path.read_text())
        ledger = PrivacyLedger(state, site=str(doc["site"]), max_epsilon=float(doc["max_epsilon"]),
                               delta=float(doc["delta"]), accountant=str(doc.get("accountant", "rdp")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StatusError(f"cannot read the privacy ledger {path}: {err}") from err
    entries = ledger.contributions()
    runs: dict[str, dict[str, Any]] = {}
    for c in entries:
        name = c.run_id.split("@", 1)[0]
        run = runs.setdefault(name, {"run": name, "train_rounds": [], "evaluations": 0, "first": c.recorded_at})
        if c.kind == "train":
            run["train_rounds"].append(c.round)
        else:
            run["evaluations"] += 1
        run["last"] = c.recorded_at
    return {
        "state_dir": str(state),
        "ledger": str(path),
        "site": ledger.site,
        "spent_epsilon": ledger.spent_epsilon(),
        "max_epsilon": ledger.max_epsilon,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "groups": ledger.patient_epsilons(),
        "runs": list(runs.values()),
        "entries": [
            {"run_id": c.run_id, "round": c.round, "kind": c.kind, "noise_multiplier": c.noise_multiplier,
             "sample_rate": c.sample_rate, "steps": c.steps, "delta": c.delta, "accountant": c.accountant,
             "max_grad_norm": c.max_grad_norm, "images": c.n_train, "epsilon_after": c.epsilon_after,
             "recorded_at": c.recorded_at, "dataset": c.dataset_fingerprint[:12]}
            for c in entries
        ],
        "refusals": ledger.refusals(),
        "policy": policy,
    }


def run_policy(state: Path) -> dict[str, Any]:
    """The approved run policy as status shows it: its rules in words, when, why; or why it cannot be read."""
    from client.run_policy import PolicyError, describe, load_policy

    try:
        doc = load_policy(state)
    except PolicyError as err:
        return {"error": str(err), "rules": []}
    if doc is None:
        return {"rules": [], "approved": None}
    return {"rules": [describe(k, r) for k, r in doc["rules"].items()], "approved": doc.get("approved"),
            "note": doc.get("note", "")}


def _policy_lines(policy: dict[str, Any]) -> list[str]:
    if policy.get("error"):
        return ["", f"run policy: {policy['error']}"]
    if not policy["rules"]:
        return ["", "run policy: none approved (the node config's ranges hold; fl-client approve --policy FILE)"]
    return ["", f"run policy approved {policy['approved']}{': ' + policy['note'] if policy.get('note') else ''} "
            "(runs outside it are refused):", *(f"  {rule}" for rule in policy["rules"])]


#: What a site's state dir holds once ``fl-client start`` or ``check --state-dir`` used it, ledger or not.
_STATE_FILES = ("salt", "node-config.toml", "approved-bundles.json")


def missing_ledger_message(state: Path, ledger_name: str) -> str:
    """One line: no ledger in ``state``, whether the folder looks like a site's state dir, and where to look."""
    where = (f"the site's state dir is the one `fl-client start` prints at its start (its site home's state/, "
             f"{SITE_HOME_HINT}); it holds {ledger_name}")
    if any((state / name).exists() for name in _STATE_FILES):
        return (f"no privacy ledger in {state}: this state dir has recorded no charge (nothing trained or evaluated "
                f"here yet, or its ledger was removed); if this is not the site's live state dir, {where}")
    return f"no privacy ledger in {state}: this is not a site's state dir; {where}"


def render_status(status: dict[str, Any]) -> str:
    """The status for a terminal: the headline, the patient groups, runs and refusals."""
    lines = [
        f"site {status['site']}: the most exposed patient has spent epsilon {status['spent_epsilon']:.3f} of "
        f"max-epsilon {status['max_epsilon']:g} (delta {status['delta']:g}, {status['accountant']} accountant)",
        "",
        "patients grouped by what touched them (largest epsilon first):",
    ]
    for g in status["groups"]:
        who = f"{g['patients']} patient(s)" if g["patients"] else "every patient (entries of an older ledger)"
        lines.append(f"  {who:<44} epsilon {g['epsilon']:.3f}  from {g['entries']} charge(s): {', '.join(g['kinds'])}")
    lines += ["", "runs:"]
    for r in status["runs"]:
        rounds = ", ".join(str(x) for x in sorted(r["train_rounds"])) or "none"
        lines.append(f"  {r['run']:<40} trained rounds {rounds}; {r['evaluations']} evaluation(s); last {r['last']}")
    if status["refusals"]:
        lines += ["", f"refused ({len(status['refusals'])}):"]
        for item in status["refusals"]:
            lines.append(f"  round {item['round']} of {item['run_id'].split('@')[0]}: {item['reason']} "
                         f"(would reach {item['epsilon_after']:.3f}; {item.get('attempts', 1)} attempt(s))")
    return "\n".join(lines + _policy_lines(status["policy"]))
