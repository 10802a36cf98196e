"""How much noise a site puts on an evaluation reply: most of its evaluation budget on the final one.

The coordinator asks for an evaluation of the global model every round; only the last one (the
model it will export) sets the exported threshold, calibration and the model card's figures. So
the site answers routine rounds coarsely and the final evaluation precisely, from its own setting
``eval-noise`` alone (node config; nothing the coordinator sends changes the amounts):

* a routine evaluation: noise std ``ROUTINE_FACTOR * eval-noise`` per count (20 at the default 10);
* a final evaluation: ``FINAL_FACTOR * eval-noise`` per count (4 at the default), at most
  ``max-final-evaluations`` (site setting, default 2: one more after a crash and resume) per run;
  a further "final" request is answered at the routine noise.

Each reply is charged to the validation patients at its own noise (client/round.py), so a
coordinator that calls every evaluation final gets precise answers only by spending the
patients' budget faster, and the site's max-epsilon still refuses the one that would pass it.
At the defaults an 8-round run costs what 8 evaluations at std 10 cost before (RDP composes as
the sum of 1/sd^2: 7/20^2 + 1/4^2 = 8/10^2), docs/privacy.md.
"""

from __future__ import annotations

from client.ledger import PrivacyLedger
from common.site_config import SiteConfig

ROUTINE_FACTOR = 2.0
FINAL_FACTOR = 0.4
#: Ledger kinds of the evaluation charges: routine and final histograms.
EVALUATION_KINDS = ("evaluate", "final-evaluate")


def finals_answered(ledger: PrivacyLedger, run_prefix: str) -> int:
    """Final evaluations this site has already answered (and been charged for) in this run."""
    return sum(1 for c in ledger.contributions() if c.kind == "final-evaluate" and c.run_id.startswith(run_prefix))


def histogram_noise(site: SiteConfig, final_requested: bool, finals_done: int) -> tuple[float, bool]:
    """(noise std per count, whether this is answered as the final evaluation)."""
    if final_requested and finals_done < site.max_final_evaluations:
        return FINAL_FACTOR * site.eval_noise, True
    return ROUTINE_FACTOR * site.eval_noise, False
