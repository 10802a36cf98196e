"""server/pki.py and the provisioning commands of server/cli.py: real keys, certificates, CRLs and TLS handshakes."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from client.provision import init_site
from server import pki
from server import sites as site_table
from server.cli import main as server_main
from server.pki import ProvisionError

ADDRESS = "fl.example.org:9443"
SITE = "st-marys"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    return pki.init_federation(tmp_path / "coord", ADDRESS, sans=["10.0.0.5", "FL-alt.example.org"], name="lungs")


def _request(tmp_path: Path, site: str = SITE) -> Path:
    return init_site(tmp_path / f"site-{site}", site)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _resign(request: dict[str, Any], auth_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """What a careful forger would do: re-sign the edited request with an auth key of its own."""
    request = dict(request)
    request["auth_public_key"] = auth_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH).decode()
    request["auth_signature"] = base64.b64encode(auth_key.sign(site_table.signed_payload(request), ec.ECDSA(hashes.SHA384()))).decode()
    return request


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def _csr_signed_by_other_key(site: str, subject_key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey) -> str:
    """A CSR carrying ``subject_key``'s public key but signed by ``signer`` (DER rebuilt by hand)."""
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
           .sign(subject_key, hashes.SHA256()))
    der, tbs = csr.public_bytes(serialization.Encoding.DER), csr.tbs_certrequest_bytes
    start = der.index(tbs) + len(tbs)
    algorithm = der[start : start + 2 + der[start + 1]]
    forged = _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signer.sign(tbs, ec.ECDSA(hashes.SHA256()))))
    return x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM).decode()


class TestInitFederation:
    def test_layout_and_modes(self, fed: Path) -> None:
        paths = pki.federation_paths(fed)
        for path in (paths.federation, paths.ca_key, paths.ca_cert, paths.server_key, paths.server_cert, paths.crl):
            assert path.is_file(), path
        assert paths.sites.is_dir() and not any(paths.sites.iterdir())
        assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
        assert pki.load_federation(fed) == {"federation": "lungs", "address": ADDRESS, "created": pki.load_federation(fed)["created"],
                                            "sans": ["fl.example.org", "10.0.0.5", "fl-alt.example.org", "localhost", "127.0.0.1"]}

    def test_ca(self, fed: Path) -> None:
        ca = _cert(pki.federation_paths(fed).ca_cert)
        assert isinstance(ca.public_key().curve, ec.SECP384R1)
        ca.verify_directly_issued_by(ca)
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
        years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
        assert 9.9 < years < 10.1

    def test_server_certificate(self, fed: Path) -> None:
        paths = pki.federation_paths(fed)
        ca, server = _cert(paths.ca_cert), _cert(paths.server_cert)
        server.verify_directly_issued_by(ca)
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "fl-alt.example.org", "localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")]
        assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH])
        assert 729 <= (server.not_valid_after_utc - dt.datetime.now(dt.UTC)).days <= 730
        key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
        assert key.public_key() == server.public_key()
        verifier = PolicyBuilder().store(Store([ca]))  # RFC 5280 path validation, as a strict TLS client would do
        for name in (DNSName("fl.example.org"), DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1")),
                     IPAddress(ipaddress.ip_address("10.0.0.5"))):
            verifier.build_server_verifier(name).verify(server, [])
        with pytest.raises(VerificationError):
            verifier.build_server_verifier(DNSName("evil.example.org")).verify(server, [])

    def test_empty_crl(self, fed: Path) -> None:
        paths = pki.federation_paths(fed)
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
        assert crl.is_signature_valid(_cert(paths.ca_cert).public_key()) and len(crl) == 0
        assert 364 <= (crl.next_update_utc - dt.datetime.now(dt.UTC)).days <= 365

    def test_existing_federation_is_kept_unless_force(self, fed: Path) -> None:
        ca_before = pki.federation_paths(fed).ca_cert.read_bytes()
        with pytest.raises(ProvisionError, match="already holds a federation .*use --force"):
            pki.init_federation(fed, ADDRESS)
        assert pki.federation_paths(fed).ca_cert.read_bytes() == ca_before
        pki.init_federation(fed, ADDRESS, force=True)
        assert pki.federation_paths(fed).ca_cert.read_bytes() != ca_before
        (archive,) = fed.glob("replaced-*")
        assert (archive / "pki" / "ca.pem").read_bytes() == ca_before and _mode(archive / "pki" / "ca.key") == 0o600

    @pytest.mark.parametrize(("address", "sans", "message"), [
        ("fl.example.org", (), "is not HOST:PORT"), ("fl.example.org:0", (), "is not HOST:PORT"),
        ("host:99999", (), "is not HOST:PORT"), ("fl.example.org:9443", ("not a name!",), "neither an IP address nor a DNS name"),
    ])
    def test_bad_arguments(self, tmp_path: Path, address: str, sans: tuple[str, ...], message: str) -> None:
        with pytest.raises(ProvisionError, match=message):
            pki.init_federation(tmp_path / "coord", address, sans=sans)
        assert not (tmp_path / "coord").exists()

    def test_ipv6_address(self, tmp_path: Path) -> None:
        root = pki.init_federation(tmp_path / "coord", "[2001:db8::1]:9443")
        san = _cert(pki.federation_paths(root).server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address("2001:db8::1") in san.get_values_for_type(x509.IPAddress)

    def test_not_a_federation(self, tmp_path: Path) -> None:
        with pytest.raises(ProvisionError, match="is not a fedxray federation .*run fl-server init"):
            pki.load_federation(tmp_path)
        with pytest.raises(ProvisionError, match="run fl-server init"):
            site_table.list_sites(tmp_path)


class TestAdmit:
    def test_kit_and_record(self, fed: Path, tmp_path: Path) -> None:
        request_path = _request(tmp_path)
        site_dir = request_path.parent
        kit = site_table.admit(fed, request_path)
        paths = pki.federation_paths(fed)
        assert kit == paths.kit(SITE)
        assert sorted(p.name for p in kit.iterdir()) == ["ca.pem", "client.pem", "coordinator.json"]
        assert _load(kit / "coordinator.json") == {"federation": "lungs", "address": ADDRESS, "site": SITE}
        assert (kit / "ca.pem").read_bytes() == paths.ca_cert.read_bytes()

        ca, cert = _cert(kit / "ca.pem"), _cert(kit / "client.pem")
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        assert cert.issuer == ca.subject
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SITE
        assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH])
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert 364 <= (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days <= 365
        tls_key = serialization.load_pem_private_key((site_dir / "tls.key").read_bytes(), password=None)
        assert cert.public_key() == tls_key.public_key()
        verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(cert, [])
        assert verified.subjects == [x509.UniformResourceIdentifier(pki.site_uri(SITE))]

        record = _load(paths.site(SITE) / "site.json")
        assert record["site"] == SITE and record["serial"] == format(cert.serial_number, "x")
        assert record["revoked"] is None and record["node_id"] is None
        assert (paths.site(SITE) / "client.pem").read_bytes() == (kit / "client.pem").read_bytes()
        site_pub = serialization.load_ssh_public_key((paths.site(SITE) / "auth.pub").read_bytes())
        assert site_pub == serialization.load_ssh_private_key((site_dir / "auth.key").read_bytes(), None).public_key()
        if shutil.which("ssh-keygen"):  # the fingerprint an operator can recompute with standard tools
            out = subprocess.run(["ssh-keygen", "-l", "-f", str(paths.site(SITE) / "auth.pub")], capture_output=True, text=True,
                                 check=True).stdout
            assert out.split()[1] == record["auth_key_sha256"]

    def test_no_private_key_leaves_its_owner(self, fed: Path, tmp_path: Path) -> None:
        kit = site_table.admit(fed, _request(tmp_path))
        paths = pki.federation_paths(fed)
        for folder in (kit, paths.sites):
            for path in folder.rglob("*"):
                if path.is_file():
                    assert b"PRIVATE" not in path.read_bytes(), path
        assert {p.name for p in fed.rglob("*.key")} == {"ca.key", "server.key"}

    def test_out_folder(self, fed: Path, tmp_path: Path) -> None:
        kit = site_table.admit(fed, _request(tmp_path), out=tmp_path / "to-send")
        assert kit == tmp_path / "to-send" and (kit / "client.pem").is_file()

    def test_registration_helpers(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path, "alpha"))
        site_table.admit(fed, _request(tmp_path, "beta"))
        pending = site_table.pending_registrations(fed)
        assert [p["site"] for p in pending] == ["alpha", "beta"]
        assert Path(pending[0]["auth_pub"]) == pki.federation_paths(fed).site("alpha") / "auth.pub"
        site_table.record_node_id(fed, "alpha", 8_411_523_017)
        assert [p["site"] for p in site_table.pending_registrations(fed)] == ["beta"]
        rows = {r["site"]: r for r in site_table.list_sites(fed)}
        assert rows["alpha"]["node_id"] == 8_411_523_017 and rows["beta"]["node_id"] is None
        assert rows["alpha"]["cert_expires"] == rows["alpha"]["expires"]
        with pytest.raises(ProvisionError, match="non-negative integer"):
            site_table.record_node_id(fed, "beta", -1)
        with pytest.raises(ProvisionError, match="no site 'gamma'"):
            site_table.record_node_id(fed, "gamma", 1)

    def test_duplicate_site_is_refused(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path))
        with pytest.raises(ProvisionError, match=f"site '{SITE}' is already admitted .*fl-server remove {SITE} first"):
            site_table.admit(fed, init_site(tmp_path / "second-folder", SITE))

    def test_keys_reused_under_another_name_are_refused(self, fed: Path, tmp_path: Path) -> None:
        request_path = _request(tmp_path)
        site_table.admit(fed, request_path)
        tls_key = serialization.load_pem_private_key((request_path.parent / "tls.key").read_bytes(), password=None)
        auth_key = serialization.load_ssh_private_key((request_path.parent / "auth.key").read_bytes(), None)
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twin")]))
               .sign(tls_key, hashes.SHA256()))
        request = {**_load(request_path), "site": "twin", "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
        (tmp_path / "twin.json").write_text(json.dumps(_resign(request, auth_key)))
        with pytest.raises(ProvisionError, match="SuperNode key is already used by site 'st-marys'"):
            site_table.admit(fed, tmp_path / "twin.json")
        (tmp_path / "twin.json").write_text(json.dumps(_resign(request, ec.generate_private_key(ec.SECP384R1()))))
        with pytest.raises(ProvisionError, match="TLS key is already used by site 'st-marys'"):
            site_table.admit(fed, tmp_path / "twin.json")


class TestRefusedRequests:
    """Each refusal names the problem; nothing is written for a refused request."""

    @pytest.fixture
    def request_data(self, tmp_path: Path) -> dict[str, Any]:
        return _load(_request(tmp_path))

    def _refused(self, fed: Path, tmp_path: Path, data: Any, message: str) -> str:
        path = tmp_path / "edited.request.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(ProvisionError, match=message) as info:
            site_table.admit(fed, path)
        paths = pki.federation_paths(fed)
        assert not any(paths.sites.iterdir()) and not paths.kits.exists()
        return str(info.value)

    def test_csr_signed_by_another_key(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        own, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        request = {**request_data, "csr": _csr_signed_by_other_key(SITE, own, other)}
        self._refused(fed, tmp_path, _resign(request, ec.generate_private_key(ec.SECP384R1())), "CSR's signature does not verify")

    def test_swapped_auth_key(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        other = ec.generate_private_key(ec.SECP384R1()).public_key()
        line = other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        self._refused(fed, tmp_path, {**request_data, "auth_public_key": line}, "`auth_signature` does not verify")

    def test_swapped_csr(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        stranger = _load(_request(tmp_path / "stranger"))
        self._refused(fed, tmp_path, {**request_data, "csr": stranger["csr"]}, "`auth_signature` does not verify")

    def test_renamed_site(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        message = self._refused(fed, tmp_path, {**request_data, "site": "st-johns"}, "refused")
        assert "the CSR names CN=st-marys but the request is for site 'st-johns'" in message
        assert "`auth_signature` does not verify" in message
        assert len(message.splitlines()) == 3  # the heading and one line per problem

    def test_flipped_csr_byte(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        lines = request_data["csr"].splitlines()
        lines[-2] = lines[-2][:-4] + ("AAAA" if lines[-2][-4:] != "AAAA" else "BBBB")  # inside the signature
        self._refused(fed, tmp_path, {**request_data, "csr": "\n".join(lines) + "\n"}, "CSR|csr")

    def test_bad_site_name(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        self._refused(fed, tmp_path, {**request_data, "site": "St Marys"}, "site name 'St Marys' is invalid")

    def test_auth_key_not_ec(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        line = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                              serialization.PublicFormat.OpenSSH).decode()
        self._refused(fed, tmp_path, {**request_data, "auth_public_key": line}, "Ed25519PublicKey.*NIST curve")

    def test_not_a_request(self, fed: Path, tmp_path: Path, request_data: dict[str, Any]) -> None:
        self._refused(fed, tmp_path, "{not json", "not JSON")
        self._refused(fed, tmp_path, {**request_data, "fedxray_request": 2}, "not a fedxray request version 1")
        self._refused(fed, tmp_path, {k: v for k, v in request_data.items() if k != "csr"}, "missing field `csr`")
        with pytest.raises(ProvisionError, match="cannot read request"):
            site_table.admit(fed, tmp_path / "absent.json")


class TestRevoke:
    def test_remove_puts_serial_in_signed_crl(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path, "alpha"))
        site_table.admit(fed, _request(tmp_path, "beta"))
        site_table.record_node_id(fed, "alpha", 42)
        paths = pki.federation_paths(fed)
        assert site_table.revoke(fed, "alpha") == 42
        assert site_table.revoke(fed, "beta") is None
        ca = _cert(paths.ca_cert)
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
        assert crl.is_signature_valid(ca.public_key())
        for site in ("alpha", "beta"):
            serial = _cert(paths.site(site) / "client.pem").serial_number
            assert crl.get_revoked_certificate_by_serial_number(serial) is not None
            record = _load(paths.site(site) / "site.json")
            assert record["revoked"] and (paths.site(site) / "client.pem").is_file()  # kept for audit
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
        assert site_table.pending_registrations(fed) == []
        with pytest.raises(ProvisionError, match="was removed on .*must not be registered"):
            site_table.record_node_id(fed, "alpha", 43)

    def test_remove_twice_and_readmit(self, fed: Path, tmp_path: Path) -> None:
        request_path = _request(tmp_path)
        site_table.admit(fed, request_path)
        paths = pki.federation_paths(fed)
        first = _load(paths.site(SITE) / "site.json")
        site_table.record_node_id(fed, SITE, 7)
        assert site_table.revoke(fed, SITE) == 7
        crl_after_first = paths.crl.read_bytes()
        assert site_table.revoke(fed, SITE) == 7  # idempotent: the caller may retry its SuperLink unregistration
        assert paths.crl.read_bytes() == crl_after_first

        site_table.admit(fed, request_path)  # re-admission after removal (e.g. renewal)
        second = _load(paths.site(SITE) / "site.json")
        assert second["serial"] != first["serial"] and second["revoked"] is None and second["node_id"] is None
        assert _load(paths.site(SITE) / "previous" / first["serial"] / "site.json")["revoked"]
        assert [r["site"] for r in site_table.list_sites(fed)] == [SITE]

    def test_unknown_site(self, fed: Path) -> None:
        with pytest.raises(ProvisionError, match="no site 'ghost'"):
            site_table.revoke(fed, "ghost")


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> str:
    """One TLS connection on loopback; returns 'ok' or the server's reason for refusing it."""
    result: dict[str, str] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
                    result["server"] = "ok"
            except (ssl.SSLError, OSError) as err:
                result["server"] = str(err)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                result["client"] = tls.recv(2).decode()
        except (ssl.SSLError, OSError) as err:
            result["client"] = str(err)
        thread.join(10)
    return "ok" if result == {"server": "ok", "client": "ok"} else result.get("server", "no answer")


class TestTlsHandshake:
    """Mutual TLS as the fleet proxy does it, with Python's ssl module on loopback."""

    @staticmethod
    def _server(fed: Path, with_crl: bool = False) -> ssl.SSLContext:
        paths = pki.federation_paths(fed)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(paths.server_cert, paths.server_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=paths.ca_cert)
        if with_crl:  # like nginx ssl_crl
            ctx.load_verify_locations(cafile=paths.crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    @staticmethod
    def _client(site_dir: Path, kit: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=kit / "ca.pem")
        ctx.load_cert_chain(kit / "client.pem", site_dir / "tls.key")
        return ctx

    def test_admitted_site_is_accepted_and_stranger_refused(self, fed: Path, tmp_path: Path) -> None:
        request_path = _request(tmp_path)
        kit = site_table.admit(fed, request_path)
        client = self._client(request_path.parent, kit)
        for hostname in ("fl.example.org", "localhost", "127.0.0.1"):
            assert _handshake(self._server(fed), client, hostname) == "ok"

        other = pki.init_federation(tmp_path / "other-coord", "10.9.9.9:9443")
        stranger_request = init_site(tmp_path / "stranger", "stranger")
        stranger_kit = site_table.admit(other, stranger_request)
        stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        stranger.load_verify_locations(cafile=kit / "ca.pem")  # it even trusts our CA: its own certificate is what fails
        stranger.load_cert_chain(stranger_kit / "client.pem", stranger_request.parent / "tls.key")
        assert "certificate verify failed" in _handshake(self._server(fed), stranger, "fl.example.org")

        no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        no_cert.load_verify_locations(cafile=kit / "ca.pem")
        assert _handshake(self._server(fed), no_cert, "fl.example.org") != "ok"

    def test_removed_site_is_refused_with_the_crl(self, fed: Path, tmp_path: Path) -> None:
        request_path = _request(tmp_path)
        kit = site_table.admit(fed, request_path)
        client = self._client(request_path.parent, kit)
        assert _handshake(self._server(fed, with_crl=True), client, "localhost") == "ok"  # the initial empty CRL is valid
        site_table.revoke(fed, SITE)
        assert "certificate revoked" in _handshake(self._server(fed, with_crl=True), client, "localhost")


class TestCli:
    def test_provisioning_commands(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        coord = str(tmp_path / "coord")
        assert server_main(["init", "--dir", coord, "--address", ADDRESS, "--san", "10.0.0.5", "--name", "lungs"]) == 0
        assert "10.0.0.5, localhost, 127.0.0.1" in capsys.readouterr().out
        assert server_main(["init", "--dir", coord, "--address", ADDRESS]) == 2
        assert capsys.readouterr().err.startswith("fl-server init: ")

        request_path = _request(tmp_path)
        assert server_main(["admit", str(request_path), "--dir", coord]) == 0
        out = capsys.readouterr().out
        assert str(Path(coord, "kits", SITE)) in out and "copy the three files into their fedxray-site folder" in out
        assert site_table.read_request(request_path).check_code in out
        assert server_main(["admit", str(request_path), "--dir", coord]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fl-server admit: site '{SITE}' is already admitted") and err.count("\n") == 1

        assert server_main(["sites", "--dir", coord]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["SITE", "ADMITTED", "REVOKED", "NODE", "ID", "CERT", "EXPIRES"]
        assert table[1].split()[0] == SITE and "pending" in table[1]
        site_table.record_node_id(coord, SITE, 99)
        assert server_main(["remove", SITE, "--dir", coord]) == 0
        assert "flwr supernode unregister 99" in capsys.readouterr().out
        assert server_main(["remove", SITE, "--dir", coord]) == 0
        assert "already removed" in capsys.readouterr().out
        assert server_main(["sites", "--dir", coord, "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["site"] == SITE and row["revoked"] and row["node_id"] == 99

    def test_errors_are_one_line(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert server_main(["sites", "--dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fl-server sites: ") and "run fl-server init" in err and err.count("\n") == 1
        assert server_main(["init", "--dir", str(tmp_path / "c"), "--address", "nohost"]) == 2
        assert "is not HOST:PORT" in capsys.readouterr().err
        assert server_main(["remove", "ghost", "--dir", str(tmp_path)]) == 2


def _sign_crl(fed: Path, *, last: dt.datetime, next_: dt.datetime, serials: list[int], number: int) -> None:
    """Write pki/crl.pem as the federation's CA would have, with the given dates (real signature)."""
    paths = pki.federation_paths(fed)
    ca = _cert(paths.ca_cert)
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(last).next_update(next_)
               .add_extension(x509.CRLNumber(number), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                                  .revocation_date(last).build())
    paths.crl.write_bytes(builder.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM))


class TestCrlLife:
    """Row 7 of issue 10: a CRL past its next-update makes nginx refuse every site; it must be renewed."""

    NOW = dt.datetime.now(dt.UTC)

    def test_expired_crl_is_renewed_with_the_same_entries(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path))
        serial = _cert(pki.federation_paths(fed).site(SITE) / "client.pem").serial_number
        _sign_crl(fed, last=self.NOW - dt.timedelta(days=400), next_=self.NOW - dt.timedelta(days=35), serials=[serial],
                  number=7)
        assert pki.crl_state(fed).days_left() < 0 and pki.crl_state(fed).due()
        assert "expired on" in pki.crl_warning(fed) and "fl-server renew-crl" in pki.crl_warning(fed)

        assert pki.renew_crl(fed) is True
        paths = pki.federation_paths(fed)
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
        assert crl.is_signature_valid(_cert(paths.ca_cert).public_key())
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None and len(crl) == 1
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 8
        assert 364 <= (crl.next_update_utc - self.NOW).days <= 365
        assert pki.crl_warning(fed) is None
        assert pki.renew_crl(fed) is False  # fresh: not re-signed again
        assert paths.crl.read_bytes() == crl.public_bytes(serialization.Encoding.PEM)

    def test_the_start_path_renews_an_expired_crl(self, fed: Path) -> None:
        from server.coordinator import Layout, refresh_crl

        _sign_crl(fed, last=self.NOW - dt.timedelta(days=366), next_=self.NOW - dt.timedelta(days=1), serials=[], number=1)
        assert refresh_crl(Layout(fed)) is None  # renewed, nothing to warn about
        assert pki.crl_state(fed).days_left() > 364

    def test_old_crl_is_renewed_before_it_is_close_to_expiry(self, fed: Path) -> None:
        _sign_crl(fed, last=self.NOW - dt.timedelta(days=31), next_=self.NOW + dt.timedelta(days=300), serials=[], number=2)
        assert pki.crl_state(fed).due() and pki.crl_warning(fed) is None  # due by age, no warning yet
        assert pki.renew_crl(fed) is True and pki.crl_state(fed).number == 3

    def test_without_the_ca_key_start_refuses_an_expired_crl_and_warns_before(self, fed: Path) -> None:
        from server.coordinator import CoordinatorError, Layout, refresh_crl

        paths = pki.federation_paths(fed)
        _sign_crl(fed, last=self.NOW - dt.timedelta(days=355), next_=self.NOW + dt.timedelta(days=10), serials=[], number=1)
        paths.ca_key.rename(fed / "ca.key.offline")
        warning = refresh_crl(Layout(fed))
        assert warning and "expires on" in warning and ("(in 9 days)" in warning or "(in 10 days)" in warning)
        assert "\n" not in warning
        (fed / "ca.key.offline").rename(paths.ca_key)
        _sign_crl(fed, last=self.NOW - dt.timedelta(days=370), next_=self.NOW - dt.timedelta(days=5), serials=[], number=1)
        paths.ca_key.rename(fed / "ca.key.offline")
        with pytest.raises(CoordinatorError, match="expired on .*refuses every site; run fl-server renew-crl"):
            refresh_crl(Layout(fed))
        assert pki.crl_state(fed).days_left() < 0  # nothing written without the key

    def test_status_warns_a_month_ahead(self, fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
        _sign_crl(fed, last=self.NOW - dt.timedelta(days=355), next_=self.NOW + dt.timedelta(days=10), serials=[], number=1)
        assert server_main(["status", "--dir", str(fed)]) == 0
        out = capsys.readouterr().out.splitlines()
        warnings = [line for line in out if line.startswith("warning: ")]
        assert len(warnings) == 1 and "crl.pem expires on" in warnings[0] and "fl-server renew-crl" in warnings[0]
        assert server_main(["status", "--dir", str(fed), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["crl"]["days_left"] in (9, 10) and len(doc["warnings"]) == 1
        _sign_crl(fed, last=self.NOW, next_=self.NOW + dt.timedelta(days=200), serials=[], number=2)
        assert server_main(["status", "--dir", str(fed)]) == 0
        assert "warning" not in capsys.readouterr().out

    def test_renew_crl_command_and_admit_keep_it_fresh(self, fed: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
        _sign_crl(fed, last=self.NOW - dt.timedelta(days=340), next_=self.NOW + dt.timedelta(days=25), serials=[], number=4)
        site_table.admit(fed, _request(tmp_path))  # holds the CA key: renews the due CRL on the way
        assert pki.crl_state(fed).number == 5 and pki.crl_state(fed).days_left() > 364
        assert server_main(["renew-crl", "--dir", str(fed)]) == 0  # forced
        assert pki.crl_state(fed).number == 6 and "the next fl-server start serves it" in capsys.readouterr().out
        pki.federation_paths(fed).ca_key.unlink()
        assert server_main(["renew-crl", "--dir", str(fed)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fl-server renew-crl: ") and "ca.key is missing" in err and err.count("\n") == 1


class TestBinding:
    """Row 10: a site's certificate and SuperNode key are bound by the CA at admission and checked before registration."""

    def test_admitted_site_passes(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path))
        record = _load(pki.federation_paths(fed).site(SITE) / "site.json")
        assert record["binding"] and record["cert_sha256"] == _cert(pki.federation_paths(fed).site(SITE) / "client.pem"
                                                                    ).fingerprint(hashes.SHA256()).hex()
        site_table.check_binding(fed, SITE)

    def test_swapped_auth_key_is_not_registered(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path))
        site_dir = pki.federation_paths(fed).site(SITE)
        other = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                                  serialization.PublicFormat.OpenSSH)
        (site_dir / "auth.pub").write_bytes(other + b" fedxray:st-marys\n")
        with pytest.raises(ProvisionError, match="auth.pub is not the SuperNode key admitted for st-marys"):
            site_table.check_binding(fed, SITE)
        # Editing the record to match the swapped key breaks the CA's signature instead.
        record = _load(site_dir / "site.json")
        record["auth_key_sha256"] = pki.ssh_fingerprint(other.decode())
        (site_dir / "site.json").write_text(json.dumps(record))
        with pytest.raises(ProvisionError, match="site.json was altered after admission") as info:
            site_table.check_binding(fed, SITE)
        assert "\n" not in str(info.value) and f"fl-server remove {SITE}" in str(info.value)

    def test_swapped_certificate_is_not_registered(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path, "alpha"))
        site_table.admit(fed, _request(tmp_path, "beta"))
        paths = pki.federation_paths(fed)
        shutil.copy(paths.site("beta") / "client.pem", paths.site("alpha") / "client.pem")
        with pytest.raises(ProvisionError, match="client.pem is not the certificate issued to alpha"):
            site_table.check_binding(fed, "alpha")
        site_table.check_binding(fed, "beta")

    def test_record_without_binding_is_not_registered(self, fed: Path, tmp_path: Path) -> None:
        site_table.admit(fed, _request(tmp_path))
        path = pki.federation_paths(fed).site(SITE) / "site.json"
        path.write_text(json.dumps({k: v for k, v in _load(path).items() if k != "binding"}))
        with pytest.raises(ProvisionError, match="no CA-signed binding"):
            site_table.check_binding(fed, SITE)

    def test_revoked_registrations_include_earlier_admissions(self, fed: Path, tmp_path: Path) -> None:
        request_path = _request(tmp_path)
        site_table.admit(fed, request_path)
        site_table.record_node_id(fed, SITE, 11)
        site_table.revoke(fed, SITE)
        site_table.admit(fed, request_path)  # re-admitted while the coordinator was stopped: node 11 still registered
        site_table.record_node_id(fed, SITE, 12)
        assert [r["node_id"] for r in site_table.revoked_registrations(fed)] == [11]
        site_table.revoke(fed, SITE)
        assert sorted(r["node_id"] for r in site_table.revoked_registrations(fed)) == [11, 12]
