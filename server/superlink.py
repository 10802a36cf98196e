"""Flower's SuperLink as fedxray runs it: a longer SQLite busy timeout, and local APIs only fedxray can use.

Busy timeout. With ``--database`` the SuperLink keeps its state in SQLite (WAL mode, Flower's busy
timeout 5 s). On a small coordinator VM under load (3 sites pushing 9 MB model updates while the
ServerApp aggregates on 2 cores) a write can wait longer than 5 s; the push then fails with
"database is locked", the site's reply is lost and the round waits for its timeout. Measured in
fedxray's own deployment test. This launcher raises the busy timeout to 60 s.

Local users. The SuperLink serves its Fleet, Control and Runtime APIs on one loopback port, which
every user of the coordinator host can open. Open-source Flower 1.41 authenticates no Control
request (its account-authentication hook is a no-op unless the enterprise OIDC plugin is present)
and, in its default subprocess isolation, no Runtime request either. Measured as user ``nobody``:
list runs, register a node key, start runs. This launcher closes both with what Flower offers:

- ``--control-token-file FILE``: every Control request must carry ``Authorization: Bearer <token>``
  with the token in FILE (0600, fresh at each ``fl-server start``). The check plugs into Flower's
  own hook (a ``ControlAuthnPlugin``); the stock ``flwr`` CLI sends the token from its credential
  store (``FLWR_HOME/credentials.yaml``, written by ``fl-server start`` as an ``oidc`` login), so
  no Flower client code is changed. The account stays Flower's no-op account, which owns the runs
  and nodes of existing state databases.
- ``--superexec-secret-file FILE``: the SuperLink runs with ``--isolation process`` and Flower's
  SuperExec authentication (``--superexec-auth-secret-file``, HMAC over each AcquireTask request;
  experimental in Flower 1.41), and this launcher starts that SuperExec itself, as Flower's
  subprocess isolation would (a child in the SuperLink's process group, ``--parent-pid``), plus the
  secret. Every other Runtime route needs the task token that only AcquireTask hands out.

What stays open on loopback: the Fleet API (without the proxy's client certificate; Flower's node
authentication still refuses every key not registered through the Control API) and ``/health``.
docs/operations.md ("Local users on the same host") says what a coordinator adds against that.

    python -m server.superlink [--control-token-file F] [--superexec-secret-file F] <flower-superlink args>

Nothing else in Flower is touched.
"""

from __future__ import annotations

import argparse
import hmac
import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_MS = 60_000


def control_authn_plugin(token: bytes) -> Any:
    """A Flower ``ControlAuthnPlugin`` that accepts exactly one bearer token (compared in constant time)."""
    from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.auth.typing import AccountInfo
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink.auth_plugin import ControlAuthnPlugin

    if not token:
        raise ValueError("the Control API token is empty")

    class LocalTokenAuthnPlugin(ControlAuthnPlugin):
        """Control requests from fedxray's own processes only: they hold the token file (0600)."""

        def __init__(self) -> None:
            pass

        def get_login_details(self) -> None:
            return None  # no interactive login: fl-server writes the token into flwr's credential store

        def validate_tokens_in_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[bool, Any]:
            for key, value in metadata:
                given = value.encode() if isinstance(value, str) else bytes(value)
                if key == ACCESS_TOKEN_KEY and hmac.compare_digest(given, token):
                    return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)
            return False, None

        def get_auth_tokens(self, device_code: str) -> None:
            raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, "no login on this SuperLink: use fl-server on the "
                              "coordinator host")

        def refresh_tokens(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[list, None]:
            return [], None  # nothing to refresh: a wrong token stays wrong

    return LocalTokenAuthnPlugin()


def _superexec_command(flower_args: list[str], secret_file: str) -> list[str]:
    """The SuperExec that Flower's subprocess isolation would start, plus the shared secret."""
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", default="8000")
    ap.add_argument("--ssl-ca-certfile")
    ap.add_argument("--insecure", action="store_true")
    known, _ = ap.parse_known_args(flower_args)
    host = f"[{known.host}]" if ":" in known.host else known.host
    tls = ["--insecure"] if known.insecure or not known.ssl_ca_certfile else ["--root-certificates", known.ssl_ca_certfile]
    exe = Path(sys.executable).with_name("flower-superexec")
    return [str(exe) if exe.is_file() else "flower-superexec", *tls, "--runtime-api-address",
            f"{host}:{known.port}", "--parent-pid", str(os.getpid()), "--superexec-auth-secret-file", secret_file]


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    ap = argparse.ArgumentParser(prog="python -m server.superlink", add_help=False, allow_abbrev=False)
    ap.add_argument("--control-token-file")
    ap.add_argument("--superexec-secret-file")
    ours, flower_args = ap.parse_known_args(sys.argv[1:] if argv is None else argv)

    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    # The module, not the function of the same name that flwr.superlink.cli re-exports.
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")

    if ours.control_token_file:
        plugin = control_authn_plugin(Path(ours.control_token_file).read_bytes().strip())
        cli.load_control_authn_plugin = lambda: plugin  # the hook flower_superlink calls once at start
    if ours.superexec_secret_file:
        flower_args = [*flower_args, "--isolation", "process", "--superexec-auth-secret-file", ours.superexec_secret_file]
        # A child in this process group, like Flower's own: stopping the SuperLink's group stops it
        # and the ServerApps it launched; it retries until the Runtime API below is up.
        subprocess.Popen(_superexec_command(flower_args, ours.superexec_secret_file))  # noqa: S603
    sys.argv = ["flower-superlink", *flower_args]
    cli.flower_superlink()


if __name__ == "__main__":
    main()
