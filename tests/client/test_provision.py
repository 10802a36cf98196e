"""client/provision.py: the site's keys, its request, and loading the identity back (real crypto, no mocks)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client import provision
from client.cli import main as client_main
from client.provision import ProvisionError, init_site, load_site_identity
from server import pki
from server import sites as site_table

SITE = "st-marys"


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    init_site(tmp_path / "site", SITE)
    return tmp_path / "site"


@pytest.fixture
def provisioned(tmp_path: Path, site_dir: Path) -> Path:
    """A site folder with its kit copied in, as the hospital has it after admission."""
    root = pki.init_federation(tmp_path / "coord", "fl.example.org:9443")
    kit = site_table.admit(root, site_dir / f"{SITE}.request.json")
    for name in provision.KIT_FILES:
        shutil.copy(kit / name, site_dir / name)
    return site_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestInitSite:
    def test_writes_keys_and_request(self, tmp_path: Path) -> None:
        request_path = init_site(tmp_path / "site", SITE)
        root = tmp_path / "site"
        assert request_path == root / f"{SITE}.request.json"
        assert sorted(p.name for p in root.iterdir()) == sorted(["tls.key", "auth.key", "auth.pub", request_path.name])
        request = json.loads(request_path.read_text())
        assert set(request) == {"fedxray_request", "site", "csr", "auth_public_key", "created", "auth_signature"}
        assert request["fedxray_request"] == 1 and request["site"] == SITE

        tls_key = serialization.load_pem_private_key((root / "tls.key").read_bytes(), password=None)
        assert isinstance(tls_key, ec.EllipticCurvePrivateKey) and isinstance(tls_key.curve, ec.SECP256R1)
        csr = x509.load_pem_x509_csr(request["csr"].encode())
        assert csr.is_signature_valid
        assert csr.public_key() == tls_key.public_key()
        assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SITE

    def test_private_keys_are_0600_whatever_the_umask(self, tmp_path: Path) -> None:
        old = os.umask(0)
        try:
            init_site(tmp_path / "site", SITE)
        finally:
            os.umask(old)
        assert _mode(tmp_path / "site" / "tls.key") == 0o600
        assert _mode(tmp_path / "site" / "auth.key") == 0o600
        assert _mode(tmp_path / "site" / "auth.pub") == 0o644
        assert not list((tmp_path / "site").glob(".*.tmp"))

    def test_auth_key_loads_as_flower_loads_it(self, site_dir: Path) -> None:
        key = serialization.load_ssh_private_key((site_dir / "auth.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
        pub = serialization.load_ssh_public_key((site_dir / "auth.pub").read_bytes())
        assert pub == key.public_key()
        request = json.loads((site_dir / f"{SITE}.request.json").read_text())
        assert serialization.load_ssh_public_key(request["auth_public_key"].encode()) == key.public_key()

        # Flower's own code paths: flower-supernode --auth-supernode-private-key and flwr supernode register KEY.pub
        from flwr.cli.supernode.register import try_load_public_key
        from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

        args = argparse.Namespace(auth_supernode_private_key=str(site_dir / "auth.key"), auth_supernode_public_key=None)
        private, public = _try_setup_client_authentication(args)
        assert public == key.public_key()
        spki = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert try_load_public_key(site_dir / "auth.pub") == spki

    def test_request_holds_no_private_material(self, site_dir: Path) -> None:
        text = (site_dir / f"{SITE}.request.json").read_text()
        request = json.loads(text)
        assert "PRIVATE" not in text
        decoded = [text.encode(), x509.load_pem_x509_csr(request["csr"].encode()).public_bytes(serialization.Encoding.DER),
                   base64.b64decode(request["auth_public_key"].split()[1]), base64.b64decode(request["auth_signature"])]
        tls_key = serialization.load_pem_private_key((site_dir / "tls.key").read_bytes(), password=None)
        auth_key = serialization.load_ssh_private_key((site_dir / "auth.key").read_bytes(), None)
        for key in (tls_key, auth_key):
            secret = key.private_numbers().private_value
            raw = secret.to_bytes((key.curve.key_size + 7) // 8, "big")
            assert all(raw not in blob for blob in decoded)
            assert format(secret, "x") not in text and str(secret) not in text

    @pytest.mark.parametrize("name", ["", "St-Marys", "st_marys", "st marys", "-lead", "a" * 41, "hôpital", "../x"])
    def test_bad_site_names_are_refused(self, tmp_path: Path, name: str) -> None:
        with pytest.raises(ProvisionError, match="site name .* is invalid: use 1-40 lowercase") as info:
            init_site(tmp_path / "site", name)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "site").exists()

    def test_existing_keys_are_kept_unless_force(self, site_dir: Path) -> None:
        before = (site_dir / "auth.key").read_bytes()
        with pytest.raises(ProvisionError, match="keys are never overwritten; use --force"):
            init_site(site_dir, SITE)
        with pytest.raises(ProvisionError, match="already holds"):
            init_site(site_dir, "other-name")
        assert (site_dir / "auth.key").read_bytes() == before
        init_site(site_dir, "renamed", force=True)
        assert (site_dir / "auth.key").read_bytes() != before
        assert [p.name for p in site_dir.glob("*.request.json")] == ["renamed.request.json"]  # stale request gone


class TestLoadSiteIdentity:
    def test_complete_folder(self, provisioned: Path) -> None:
        identity = load_site_identity(provisioned)
        assert identity.site == SITE
        assert identity.tls_key == provisioned / "tls.key" and identity.auth_key == provisioned / "auth.key"
        assert identity.client_cert == provisioned / "client.pem" and identity.ca_cert == provisioned / "ca.pem"
        assert identity.coordinator == {"federation": "fedxray", "address": "fl.example.org:9443", "site": SITE}
        assert identity.address == "fl.example.org:9443"

    def test_names_the_missing_kit_file(self, provisioned: Path) -> None:
        (provisioned / "client.pem").unlink()
        with pytest.raises(ProvisionError) as info:
            load_site_identity(provisioned)
        message = str(info.value)
        assert "\n" not in message
        assert f"copy client.pem from the kit your coordinator sent into {provisioned}" in message

    def test_before_the_kit_arrives(self, site_dir: Path) -> None:
        with pytest.raises(ProvisionError, match="has no ca.pem, client.pem, coordinator.json: copy"):
            load_site_identity(site_dir)

    def test_missing_keys_say_run_init(self, provisioned: Path, tmp_path: Path) -> None:
        (provisioned / "tls.key").unlink()
        with pytest.raises(ProvisionError, match="has no tls.key: run fl-client init"):
            load_site_identity(provisioned)
        with pytest.raises(ProvisionError, match="does not exist: run fl-client init"):
            load_site_identity(tmp_path / "nowhere")

    def test_kit_for_other_keys_is_refused(self, provisioned: Path) -> None:
        kit = {name: (provisioned / name).read_bytes() for name in provision.KIT_FILES}
        init_site(provisioned, SITE, force=True)  # new keys: the old certificate no longer fits
        for name, data in kit.items():
            (provisioned / name).write_bytes(data)
        with pytest.raises(ProvisionError, match="was not issued for this folder's tls.key"):
            load_site_identity(provisioned)

    def test_ca_from_another_federation_is_refused(self, provisioned: Path, tmp_path: Path) -> None:
        other = pki.init_federation(tmp_path / "other", "10.0.0.9:9443")
        shutil.copy(pki.federation_paths(other).ca_cert, provisioned / "ca.pem")
        with pytest.raises(ProvisionError, match="was not signed by ca.pem: copy both from the same kit"):
            load_site_identity(provisioned)


class TestCli:
    def test_init(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        root = tmp_path / "site"
        assert client_main(["init", "--site", SITE, "--dir", str(root)]) == 0
        out = capsys.readouterr().out
        assert f"send {SITE}.request.json to your coordinator; keep tls.key and auth.key here" in out
        request = json.loads((root / f"{SITE}.request.json").read_text())
        assert f"check code {provision.request_check_code(request)}" in out
        assert "BEGIN" not in out

        assert client_main(["init", "--site", SITE, "--dir", str(root)]) == 2
        assert capsys.readouterr().err.startswith("fl-client init: ")
        assert client_main(["init", "--site", SITE, "--dir", str(root), "--force"]) == 0

    def test_bad_name(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert client_main(["init", "--site", "Bad_Name", "--dir", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fl-client init: site name 'Bad_Name' is invalid") and err.count("\n") == 1


class TestAgreesWithServer:
    """The request format is one module both sides use (common/site_request.py); the kit's file names agree."""

    def test_same_kit_file_names(self) -> None:
        assert (provision.CA_CERT_FILE, provision.CLIENT_CERT_FILE, provision.COORDINATOR_FILE) == (
            pki.CA_CERT_FILE, pki.SITE_CERT_FILE, pki.KIT_COORDINATOR_FILE)

    def test_same_check_code(self, site_dir: Path) -> None:
        request = json.loads((site_dir / f"{SITE}.request.json").read_text())
        assert provision.request_check_code(request) == site_table.read_request(site_dir / f"{SITE}.request.json").check_code
