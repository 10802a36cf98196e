"""Flower's SuperLink, with a longer SQLite busy timeout for the persistent state database.

With ``--database`` the SuperLink keeps its state in SQLite (WAL mode, Flower's busy timeout 5 s).
On a small coordinator VM under load (3 sites pushing 9 MB model updates while the ServerApp
aggregates on 2 cores) a write can wait longer than 5 s; the push then fails with "database is
locked", the site's reply is lost and the round waits for its timeout. Measured in fedxray's own
deployment test. This launcher raises the busy timeout to 60 s and then runs the unchanged
``flower-superlink`` entry point; nothing else is touched.

    python -m server.superlink <flower-superlink args>
"""

from __future__ import annotations

import os
import sys

BUSY_TIMEOUT_MS = 60_000


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *sys.argv[1:]]
    flower_superlink()


if __name__ == "__main__":
    main()
