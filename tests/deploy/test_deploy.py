"""deploy/: images, compose demo, Kubernetes manifests and the fleet proxy example, checked without Docker.

No Docker engine or cluster runs here, so these tests check what can be checked offline and fast:
the Dockerfiles pin what pyproject.toml pins and start the real CLIs with arguments those CLIs
accept; the compose file and every manifest parse as YAML and have the shape the deployment relies
on (one published port, the proxy's; sites publish none; data read-only; telemetry off; one
coordinator replica, Recreate, non-root); the example nginx config is exactly what
server.proxy.render_nginx_conf renders and passes ``nginx -t`` with real throwaway certificates.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROXY_PORT = 9443
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_WAIT_POLICY": "PASSIVE"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """pyproject's exact pins, name (normalised, extras dropped) -> version."""
    pins = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        name, sep, version = dep.partition("==")
        assert sep, f"pyproject dependency {dep!r} is not an exact pin"
        pins[_norm(name.split("[")[0])] = version.strip()
    return pins


# ----------------------------------------------------------------------------- Dockerfiles


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path.name}: dangling line continuation"
    return out


def _args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for instr, rest in instructions:
        if instr == "ENV":
            env.update(m.groups() for m in re.finditer(r"(\w+)=(\S+)", rest))
    return env


def _exec_form(instructions: list[tuple[str, str]], name: str) -> list[str]:
    values = [rest for instr, rest in instructions if instr == name]
    assert values, f"no {name}"
    return json.loads(values[-1])  # exec form: a JSON array, so no shell sits between tini and the CLI


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


IMAGES = {
    "coordinator": {"cli": "fl-server", "module": "server.cli", "volumes": {"/federation"}},
    "site": {"cli": "fl-client", "module": "client.cli", "volumes": {"/site", "/data"}},
}


def _parser(module: str):
    return importlib.import_module(module).build_parser()


def _check_cli_args(module: str, argv: list[str]) -> None:
    """The real CLI's parser accepts ``argv`` (fl-server / fl-client options named in deploy/ exist)."""
    try:
        _parser(module).parse_args(argv)
    except SystemExit as err:
        raise AssertionError(f"{module} rejects {argv}: deploy/ and the CLI disagree") from err


@pytest.mark.parametrize("image", sorted(IMAGES))
class TestDockerfile:
    def test_base_image_and_python_match_pyproject(self, image):
        instr = parse_dockerfile(DEPLOY / f"Dockerfile.{image}")
        froms = [rest for i, rest in instr if i == "FROM"]
        assert froms == ["python:3.11-slim-bookworm"]
        assert ">=3.11" in PYPROJECT["project"]["requires-python"]

    def test_torch_pins_equal_pyproject_and_come_from_the_cpu_index(self, image):
        instr = parse_dockerfile(DEPLOY / f"Dockerfile.{image}")
        args, pins = _args(instr), _pins()
        assert args["TORCH_VERSION"] == pins["torch"]
        assert args["TORCHVISION_VERSION"] == pins["torchvision"]
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        runs = [_expand(rest, args) for i, rest in instr if i == "RUN"]
        torch_run = next(r for r in runs if "torch==" in r)
        assert f"--index-url \"{args['TORCH_INDEX_URL']}\"" in torch_run

    def test_every_pinned_package_in_the_image_has_pyprojects_version(self, image):
        instr = parse_dockerfile(DEPLOY / f"Dockerfile.{image}")
        args, pins = _args(instr), _pins()
        seen = {}
        for i, rest in instr:
            if i == "RUN" and "pip install" in rest:
                for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9_.\-\[\]]*)==([^\"'\s]+)", _expand(rest, args)):
                    seen[_norm(name.split("[")[0])] = version
        assert {"torch", "torchvision"} <= set(seen)
        assert {n: v for n, v in seen.items() if pins.get(n) != v} == {}, "pins differ from pyproject.toml"

    def test_project_installed_from_the_build_context(self, image):
        """Editable from /opt/fedxray: the app bundle (whose hash sites approve) is built from that source."""
        instr = parse_dockerfile(DEPLOY / f"Dockerfile.{image}")
        copied = {src for i, rest in instr if i == "COPY" for src in rest.split()[:-1]}
        assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
        for package in PYPROJECT["tool"]["setuptools"]["packages"]:
            assert package in copied, f"package {package} is not copied: pip install -e . would fail"
        pip_runs = [rest for i, rest in instr if i == "RUN" and "pip install" in rest]
        assert any(re.search(r"pip install -e \.(\s|$)", r) for r in pip_runs)
        for run in pip_runs:  # nothing unpinned sneaks in
            for chunk in run.split("&&"):
                if "pip install" in chunk and "-e ." not in chunk:
                    assert "==" in chunk, f"unpinned pip install: {chunk.strip()}"

    def test_runs_as_non_root_with_offline_environment(self, image):
        instr = parse_dockerfile(DEPLOY / f"Dockerfile.{image}")
        users = [rest for i, rest in instr if i == "USER"]
        assert users and users[-1] not in ("root", "0", "0:0")
        assert any("useradd" in rest and "--uid" in rest for i, rest in instr if i == "RUN")
        env = _env(instr)
        assert {k: env.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV
        assert env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1"

    def test_volumes(self, image):
        instr = parse_dockerfile(DEPLOY / f"Dockerfile.{image}")
        volumes = set().union(*(json.loads(rest) for i, rest in instr if i == "VOLUME"))
        assert volumes == IMAGES[image]["volumes"]

    def test_default_command_is_start_and_the_cli_accepts_it(self, image):
        instr = parse_dockerfile(DEPLOY / f"Dockerfile.{image}")
        entry, cmd = _exec_form(instr, "ENTRYPOINT"), _exec_form(instr, "CMD")
        assert entry == ["tini", "--", IMAGES[image]["cli"]]
        assert cmd[0] == "start"
        _check_cli_args(IMAGES[image]["module"], cmd)


def test_coordinator_image_runs_nginx_and_exposes_only_the_proxy_port():
    instr = parse_dockerfile(DEPLOY / "Dockerfile.coordinator")
    assert any("nginx-light" in rest for i, rest in instr if i == "RUN")
    assert [rest for i, rest in instr if i == "EXPOSE"] == [str(PROXY_PORT)]
    health = [rest for i, rest in instr if i == "HEALTHCHECK"]
    assert len(health) == 1 and str(PROXY_PORT) in health[0]
    cmd = _exec_form(instr, "CMD")
    assert cmd[cmd.index("--dir") + 1] == "/federation"
    assert cmd[cmd.index("--listen-port") + 1] == str(PROXY_PORT)


def test_site_image_listens_on_nothing_and_has_no_proxy():
    instr = parse_dockerfile(DEPLOY / "Dockerfile.site")
    assert not [rest for i, rest in instr if i == "EXPOSE"]
    assert not any("nginx" in rest for i, rest in instr if i == "RUN")
    assert [rest for i, rest in instr if i == "HEALTHCHECK"] == ["NONE"]
    cmd = _exec_form(instr, "CMD")
    assert (cmd[cmd.index("--kit") + 1], cmd[cmd.index("--data") + 1]) == ("/site", "/data")


# ----------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def docker_ignored(path: str, ignore_file: Path) -> bool:
    """Docker's rule: the last pattern that matches the path (or one of its parent folders) decides."""
    patterns = [ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_context_keeps_venv_runs_data_and_keys_out(image):
    ignore = DEPLOY / f"Dockerfile.{image}.dockerignore"
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/sim-1/model.onnx", "data/a/1.dcm",
                 "shared/data/x.dcm", "tests/deploy/test_deploy.py", "deploy/demo/site-a/auth.key",
                 "deploy/demo/federation/pki/ca.key", "fedxray-coordinator/pki/ca.key", "fedxray-site/tls.key",
                 "common/__pycache__/dicom.cpython-311.pyc", ".git/config"):
        assert docker_ignored(path, ignore), f"{path} would be sent to the Docker build"
    copied = [src for i, rest in parse_dockerfile(DEPLOY / f"Dockerfile.{image}") if i == "COPY" for src in rest.split()[:-1]]
    for path in [*copied, "common/dicom.py", "server/proxy.py", "client/approval.py"]:
        assert not docker_ignored(path, ignore), f"{path} is needed by the image but ignored"


# Flower's bundle builder and CLI import trigger deprecation warnings in pathspec and click (not ours).
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning", "ignore:'click.utils:DeprecationWarning")
def test_image_source_builds_the_same_app_bundle_as_the_checkout(tmp_path):
    """Sites approve a bundle hash: the files an image receives must build exactly the checkout's bundle."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    ignore = DEPLOY / "Dockerfile.site.dockerignore"
    image_src = tmp_path / "opt-fedxray"
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not docker_ignored((rel / d).as_posix(), ignore)]
        for name in files:
            path = (rel / name).as_posix()
            if not docker_ignored(path, ignore):
                (image_src / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, image_src / path)
    assert (image_src / "pyproject.toml").is_file() and not (image_src / ".gitignore").exists()

    def digest(root: Path) -> str:
        return hashlib.sha256(build_fab_from_disk(root)).hexdigest()

    assert digest(image_src) == digest(ROOT)


# ----------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _volumes(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) for short-syntax volumes."""
    out = {}
    for entry in service.get("volumes", []):
        match = re.fullmatch(r"(.+):(/[^:]*)(?::(ro|rw))?", entry)  # the source may hold ${VAR:-default}
        assert match, f"unexpected volume syntax {entry!r}"
        source, target, mode = match.groups()
        out[target] = (source, mode or "rw")
    return out


def test_compose_services_and_ports(compose):
    services = compose["services"]
    assert set(services) == {"coordinator", "site-a", "site-b"}
    assert services["coordinator"]["ports"] == [f"{PROXY_PORT}:{PROXY_PORT}"]
    for name in ("site-a", "site-b"):
        assert "ports" not in services[name] and "expose" not in services[name], f"{name} must open no port"


def test_compose_builds_from_the_repo_root_with_the_deploy_dockerfiles(compose):
    for name, image in (("coordinator", "coordinator"), ("site-a", "site"), ("site-b", "site")):
        build = compose["services"][name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert build["dockerfile"] == f"deploy/Dockerfile.{image}"


def test_compose_environment_is_offline(compose):
    for name, service in compose["services"].items():
        env = {k: str(v) for k, v in service["environment"].items()}
        assert {k: env.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV, name


def test_compose_sites_mount_their_own_data_read_only(compose):
    services = compose["services"]
    sources = []
    for name in ("site-a", "site-b"):
        vols = _volumes(services[name])
        assert vols["/data"][1] == "ro", f"{name}: the DICOM folder must be mounted read-only"
        assert {"/site", "/site/state"} <= set(vols), f"{name}: kit folder and state volume"
        sources.append({src for src, _ in vols.values()})
    assert not sources[0] & sources[1], "two sites share a folder"
    assert set(_volumes(services["coordinator"])) == {"/federation"}


def test_compose_commands_are_accepted_by_the_clis(compose):
    services = compose["services"]
    coordinator = services["coordinator"]["command"]
    _check_cli_args("server.cli", coordinator)
    assert coordinator[coordinator.index("--listen-port") + 1] == str(PROXY_PORT)
    for name in ("site-a", "site-b"):
        cmd = services[name]["command"]
        _check_cli_args("client.cli", cmd)
        assert cmd[0] == "start" and cmd[cmd.index("--data") + 1] == "/data" and cmd[cmd.index("--kit") + 1] == "/site"


def test_compose_sites_reach_only_the_coordinator(compose):
    services, networks = compose["services"], compose["networks"]
    for name in ("site-a", "site-b"):
        assert services[name]["networks"] == ["fleet"]
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert networks["fleet"]["internal"] is True
    assert set(services["coordinator"]["networks"]) == {"edge", "fleet"}


# ----------------------------------------------------------------------------- Kubernetes


def _k8s_docs() -> dict[str, list[dict]]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _by_kind() -> dict[str, dict]:
    out = {}
    for docs in _k8s_docs().values():
        for doc in docs:
            if doc.get("kind") != "Kustomization":
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = doc
    return out


def test_k8s_manifests_parse_and_live_in_one_namespace():
    kinds = _by_kind()
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service"} <= set(kinds)
    for kind, doc in kinds.items():
        assert doc["apiVersion"] and doc["metadata"]["name"], kind
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == kinds["Namespace"]["metadata"]["name"], kind


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    manifests = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def _pod() -> dict:
    return _by_kind()["Deployment"]["spec"]["template"]


def test_k8s_deployment_is_one_recreated_non_root_replica():
    deployment = _by_kind()["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "SQLite state DB: never two pods at once"
    spec = _pod()["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"] + spec.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["resources"]["requests"], container["name"]


def test_k8s_coordinator_container_probes_and_arguments():
    (container,) = _pod()["spec"]["containers"]
    assert container["ports"] == [{"name": "fleet", "containerPort": PROXY_PORT, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["tcpSocket"]["port"] in ("fleet", PROXY_PORT), probe
    _check_cli_args("server.cli", container["args"])
    assert container["args"][container["args"].index("--dir") + 1] == "/federation"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {k: env.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV


def test_k8s_federation_on_the_pvc_and_pki_from_a_secret():
    kinds, spec = _by_kind(), _pod()["spec"]
    pvc = kinds["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (container,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/federation"]["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert mounts["/federation/pki"]["readOnly"] is True
    assert "secret" in volumes[mounts["/federation/pki"]["name"]]


def test_k8s_service_exposes_only_the_proxy_port():
    kinds = _by_kind()
    service = kinds["Service"]
    assert service["spec"]["type"] in ("LoadBalancer", "NodePort")
    assert [(p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]] == [(PROXY_PORT, "fleet", "TCP")]
    labels = _pod()["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    if "NetworkPolicy" in kinds:
        ingress = kinds["NetworkPolicy"]["spec"]["ingress"]
        assert [p["port"] for rule in ingress for p in rule["ports"]] == [PROXY_PORT]


def test_k8s_init_container_refuses_a_ca_key_and_waits_for_the_federation(tmp_path):
    """Run the init container's script for real, against a stand-in for /federation."""
    (init,) = _pod()["spec"]["initContainers"]
    assert init["command"][:2] == ["python", "-c"]
    fed = tmp_path / "federation"
    (fed / "pki").mkdir(parents=True)
    script = re.sub(r'(?<=["\s])/federation', str(fed), init["command"][2])  # path starts only

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)

    for name in ("ca.pem", "server.pem", "server.key"):
        (fed / "pki" / name).write_text("x")
    out = run()
    assert out.returncode != 0 and "crl.pem" in out.stderr
    (fed / "pki" / "crl.pem").write_text("x")
    (fed / "pki" / "ca.key").write_text("x")
    out = run()
    assert out.returncode != 0 and "ca.key" in out.stderr
    (fed / "pki" / "ca.key").unlink()
    (fed / "federation.json").write_text("{}")
    out = run()
    assert out.returncode == 0 and "federation folder present" in out.stdout


# ----------------------------------------------------------------------------- the fleet proxy example


def _render_module():
    spec = importlib.util.spec_from_file_location("render_proxy_conf", DEPLOY / "render_proxy_conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def render():
    return _render_module()


def test_example_equals_the_rendered_config(render):
    from server.proxy import render_nginx_conf

    example = (DEPLOY / "nginx" / "fleet.conf.example").read_text()
    assert example == render.render_example(), "stale: run python deploy/render_proxy_conf.py"
    body = render_nginx_conf(render.example_paths(), listen=render.LISTEN, upstream=render.UPSTREAM)
    assert example.endswith(body)
    assert render.LISTEN.endswith(f":{PROXY_PORT}")


def test_example_allows_only_the_fleet_api_with_client_certificates():
    text = (DEPLOY / "nginx" / "fleet.conf.example").read_text()
    assert re.search(r"^\s*ssl_verify_client on;", text, re.M)
    assert re.search(r"^\s*ssl_crl \S+;", text, re.M)
    assert re.search(r"^\s*client_max_body_size 16m;", text, re.M)
    locations = dict(re.findall(r"location\s+(\S+)\s*\{(.*?)\}", text, re.S))
    assert set(locations) == {"/v1/fleet/", "/"}
    assert "proxy_pass" in locations["/v1/fleet/"] and text.count("proxy_pass ") == 1
    assert re.search(r"^\s*return 403\b", locations["/"], re.M)
    listens = re.findall(r"^\s*listen (\S+) ssl;", text, re.M)
    assert listens == [f"0.0.0.0:{PROXY_PORT}"]


def _throwaway_pki(pki: Path) -> None:
    """A CA, a server certificate for localhost and an empty CRL, as `fl-server init` lays them out."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_name).last_update(now - dt.timedelta(minutes=5))
           .next_update(now + dt.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    pki.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    (pki / "ca.pem").write_bytes(ca.public_bytes(pem))
    (pki / "server.pem").write_bytes(server.public_bytes(pem))
    (pki / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (pki / "server.key").chmod(0o600)
    (pki / "crl.pem").write_bytes(crl.public_bytes(pem))


def _nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("nginx is not installed: `nginx -t` of the example skipped")


def _nginx_t(render, federation: Path, as_user: int | None = None) -> subprocess.CompletedProcess:
    """Write the example relocated under ``federation`` (with real certificates) and run ``nginx -t`` on it."""
    _throwaway_pki(federation / "pki")
    text = render.render_example(federation)
    example = (DEPLOY / "nginx" / "fleet.conf.example").read_text()
    assert text == example.replace(str(render.FEDERATION), str(federation)), "the example is not the relocated config"
    proxy = federation / "proxy"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (proxy / "tmp" / sub).mkdir(parents=True)
    (proxy / "nginx.conf").write_text(text)
    cmd = [_nginx(), "-t", "-p", str(proxy), "-c", str(proxy / "nginx.conf"), "-e", "stderr"]
    if as_user is not None:
        for path in [federation, *federation.rglob("*")]:
            os.chown(path, as_user, as_user)
        cmd = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_example_passes_nginx_t_with_real_certificates(render, tmp_path):
    out = _nginx_t(render, tmp_path / "federation")
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to try the config as an unprivileged user")
def test_example_passes_nginx_t_as_a_non_root_user(render):
    """The images run nginx as a non-root user: nothing in the config may need root (e.g. /var/log/nginx)."""
    base = Path(tempfile.mkdtemp(prefix="fedxray-nginx-", dir="/tmp"))
    try:
        base.chmod(0o755)
        out = _nginx_t(render, base / "federation", as_user=65534)
        assert out.returncode == 0, out.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------- docs


#: Stable parts of the one-line messages that docs/operations.md's troubleshooting table quotes, and
#: the file that prints each. If the wording changes in the code, change the table too.
MESSAGES = {
    "cannot reach the coordinator at": "client/join.py",
    "presented a certificate that this site's ca.pem does not trust": "client/join.py",
    "rejected this site's certificate": "client/join.py",
    "refused this site's authentication key (exit": "client/join.py",
    "is not approved at this site": "client/approval.py",
    "only the Fleet API is served here": "server/proxy.py",
}


@pytest.mark.parametrize("message", sorted(MESSAGES))
def test_operations_guide_quotes_the_real_messages(message):
    assert message in (ROOT / MESSAGES[message]).read_text(), f"{MESSAGES[message]} no longer says {message!r}"
    assert message in (ROOT / "docs" / "operations.md").read_text(), f"docs/operations.md lacks {message!r}"
