"""deploy/ files for the clinic listener: they parse, pin what pyproject pins, and fl-predict accepts their arguments."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from clinic.cli import _parsers

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _serve_accepts(argv: list[str]) -> None:
    assert argv[0] == "serve"
    try:
        _parsers()["serve"].parse_args(argv[1:])
    except SystemExit as err:
        raise AssertionError(f"fl-predict serve rejects {argv}: deploy/ and the CLI disagree") from err


def _substitute(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?message} with the defaults (PACS_HOST given)."""
    env = {"PACS_HOST": "pacs.example"}
    return re.sub(r"\$\{(\w+)(?::[-?]([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), text)


def test_compose_service_runs_serve_with_a_read_only_model() -> None:
    compose = yaml.safe_load(_substitute((DEPLOY / "compose.clinic.yaml").read_text()))
    service = compose["services"]["fl-predict"]
    _serve_accepts(service["command"])
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile.clinic"}
    assert "--forward" in service["command"] and service["command"][service["command"].index("--forward") + 1] == "pacs.example:104:PACS"
    assert any(v.endswith(":/model:ro") for v in service["volumes"])
    assert service["ports"] == ["127.0.0.1:11112:11112"]  # the hospital-facing address only when FEDXRAY_BIND names it
    assert service["command"][service["command"].index("--calling-aet") + 1] == "PACS"


def test_k8s_manifest_one_namespace_one_replica_and_valid_args() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s-clinic" / "clinic.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"}
    namespace = kinds["Namespace"]["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == namespace for d in docs if d["kind"] != "Namespace")
    deployment = kinds["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    (container,) = deployment["template"]["spec"]["containers"]
    _serve_accepts(container["args"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert kinds["Service"]["spec"]["ports"][0]["port"] == 11112
    kustomization = yaml.safe_load((DEPLOY / "k8s-clinic" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["clinic.yaml"] and kustomization["namespace"] == namespace


def test_dockerfile_pins_torch_as_pyproject_and_copies_every_package() -> None:
    text = (DEPLOY / "Dockerfile.clinic").read_text()
    pins = {dep.split("==")[0].split("[")[0]: dep.split("==")[1] for dep in PYPROJECT["project"]["dependencies"] if "==" in dep}
    assert f"ARG TORCH_VERSION={pins['torch']}" in text and f"ARG TORCHVISION_VERSION={pins['torchvision']}" in text
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert packages <= set(re.findall(r"^COPY (\S+) ", text, re.MULTILINE)), "pip install . needs every package"
    lines = (DEPLOY / "Dockerfile.clinic.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip()[:1] not in ("", "#")]
    assert ignore[0] == "*" and {f"!{p}" for p in packages} <= set(ignore)  # an allow-list: nothing else is sent
    _serve_accepts(json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1)))


def test_clinic_stays_out_of_the_federated_app_bundle() -> None:
    include = PYPROJECT["tool"]["flwr"]["app"]["fab-include"]
    assert not any(p.startswith("clinic") for p in include)
    assert PYPROJECT["project"]["scripts"]["fl-predict"] == "clinic.cli:main"

