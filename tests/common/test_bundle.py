"""The app bundle fedxray builds is byte-identical to what `flwr run` builds from the same files."""

from __future__ import annotations

import hashlib

from common.bundle import app_files, build_bundle, stage_app


def test_staged_app_builds_the_same_bundle(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    fab_hash, fab = build_bundle()
    app = stage_app(tmp_path)
    assert hashlib.sha256(build_fab_from_disk(app)).hexdigest() == fab_hash  # what `flwr run <app>` ships
    assert sorted(p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()) == sorted(app_files())


def test_bundle_changes_with_the_code(tmp_path):
    app = stage_app(tmp_path)
    before, _ = build_bundle(app)
    (app / "client" / "app.py").write_text((app / "client" / "app.py").read_text() + "\n# changed\n")
    after, _ = build_bundle(app)
    assert before != after  # a site's approval covers exactly the reviewed code
