"""The site home: the one folder every ``fl-client`` subcommand works in.

It holds the site's keys and kit (``fl-client init`` writes them, ``start`` reads them) and its
state dir, ``state/`` (privacy ledger, salt, cache, approved bundles, audit log). Every subcommand
finds it the same way, in this order, and says on stderr which one it uses and why:

1. ``--site-home DIR`` on the command line;
2. the environment variable ``FEDXRAY_SITE_HOME`` (set it once for the service account);
3. the default, ``~/fedxray-site`` (the home folder of the user running fl-client).

Before, each subcommand had its own default relative to the folder it was run from, so ``fl-client
approve`` run from another folder wrote its approval where ``start`` never looked, and the site
refused every run without saying why. An explicit ``--state-dir`` (``--kit`` for ``start``,
``--dir`` for ``init``) still wins over the site home for that one folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "FEDXRAY_SITE_HOME"
DEFAULT = "~/fedxray-site"
STATE_SUBDIR = "state"
#: For messages that must say where the site's folders are.
SITE_HOME_HINT = f"default {DEFAULT}, or --site-home DIR / {ENV_VAR}"
#: Subcommands whose state dir is optional (salt and cache only): they use the site home's only where it exists.
OPTIONAL_STATE = frozenset({"check", "evaluate", "accept"})


@dataclass(frozen=True)
class SiteHome:
    path: Path  # absolute
    source: str  # "--site-home", "FEDXRAY_SITE_HOME" or "default"

    @property
    def state(self) -> Path:
        return self.path / STATE_SUBDIR

    def describe(self) -> str:
        how = {"--site-home": "from --site-home", ENV_VAR: f"from {ENV_VAR}"}.get(
            self.source, f"the default; change it with --site-home or {ENV_VAR}")
        return f"site home {self.path} ({how})"


def resolve_site_home(flag: str | None, environ: dict[str, str] | None = None) -> SiteHome:
    """The site home from the flag, else the environment variable, else the default; made absolute."""
    environ = os.environ if environ is None else environ
    if flag:
        return SiteHome(Path(flag).expanduser().resolve(), "--site-home")
    if environ.get(ENV_VAR):
        return SiteHome(Path(environ[ENV_VAR]).expanduser().resolve(), ENV_VAR)
    return SiteHome(Path(DEFAULT).expanduser().resolve(), "default")


def add_site_home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site-home", metavar="DIR",
                        help=f"the site's folder: keys, kit and state/ (default: ${ENV_VAR}, else {DEFAULT})")


def apply_site_home(args: argparse.Namespace, home: SiteHome) -> list[str]:
    """Fill the folders a subcommand was not given from the site home; returns the line to tell the user
    (none when every folder was given explicitly: the site home is then not used).

    ``state_dir`` None -> ``home/state`` (for ``check`` and ``evaluate``, whose state dir is optional,
    only when that folder exists: they must not create one); ``kit`` / ``dir`` None -> ``home``.
    """
    used = []
    for name in ("dir", "kit"):
        if getattr(args, name, "") is None:
            setattr(args, name, str(home.path))
            used.append(f"{'keys' if name == 'dir' else 'kit'} {home.path}")
    if getattr(args, "state_dir", "") is None:
        state = Path(args.kit) / STATE_SUBDIR if getattr(args, "kit", None) else home.state
        if args.command not in OPTIONAL_STATE or state.is_dir():
            args.state_dir = str(state)
            used.append(f"state dir {state}")
    return [f"fl-client {args.command}: {home.describe()}: {', '.join(used)}"] if used else []


def announce(notes: list[str]) -> None:
    """On stderr, so that ``--json`` output on stdout stays one JSON document."""
    for line in notes:
        print(line, file=sys.stderr, flush=True)
