"""What fl-sim shows of a run's progress: one line per round, readable at 3 sites and at 1,000.

The coordinator logs each round with every site's epsilon; fl-sim passes that line on as it is
for a few sites, and gives the range of the sites' epsilons when there are many (the full list
stays in run.log and metrics.json).
"""

from __future__ import annotations

import re

_EPSILONS = re.compile(r"epsilon \[([^\]]*)\]")
#: Above this many sites a round's progress line gives the range of the sites' epsilons, not each one.
MAX_SITES_LISTED = 8


def round_progress(line: str) -> str:
    """The coordinator's round line as fl-sim shows it: per-site epsilons, or their range when there are many."""
    m = _EPSILONS.search(line)
    if m is None:
        return line
    try:
        values = [float(item.rsplit(" ", 1)[1]) for item in m.group(1).split(", ") if item.strip()]
    except (IndexError, ValueError):
        return line
    if len(values) <= MAX_SITES_LISTED:
        return line
    return f"{line[:m.start()]}epsilon {min(values):.2f}-{max(values):.2f} over {len(values)} sites{line[m.end():]}"
