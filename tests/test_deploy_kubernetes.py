"""deploy/kubernetes: every manifest parses, the core resources validate strictly against the
Kubernetes OpenAPI schemas (kubernetes-validate), and the pieces fit together: the ConfigMap is a
valid exfilwatch config whose paths are the Deployment's mounts, selectors select, probes hit the
health endpoints, the pod runs non-root on a read-only root filesystem."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from detector import config
from detector.errors import ConfigError
from tests.test_deploy_support import DEPLOY, ROOT

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)"
)

K8S = DEPLOY / "kubernetes"
VERSIONS = ("1.29.0", "1.33.0")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1",
                                                          "PrometheusRule")}


def _documents() -> dict[str, dict[str, Any]]:
    """Every manifest by file name (one document per file)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        loaded = list(yaml.safe_load_all(path.read_text()))
        assert len(loaded) == 1, f"{path.name}: one document per file"
        assert isinstance(loaded[0], dict) and loaded[0].get("kind"), path.name
        docs[path.name] = loaded[0]
    return docs


def _by_kind(kind: str) -> dict[str, Any]:
    found = [d for d in _documents().values() if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    docs = _documents()
    kustomization = docs.pop("kustomization.yaml")
    docs.pop("secret.example.yaml")
    assert sorted(kustomization["resources"]) == sorted(docs)
    assert kustomization["namespace"] == "exfilwatch"
    assert all("namespace" not in d["metadata"] for d in docs.values())


@pytest.mark.parametrize("version", VERSIONS)
def test_core_resources_validate_strictly_against_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for doc in _documents().values():
        if doc["kind"] == "Kustomization" or (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert sorted(checked) == sorted(
        ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "PodDisruptionBudget",
         "Secret", "Service"]
    )


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The check above can fail: a typo in a securityContext is caught."""
    bad = copy.deepcopy(_by_kind("Deployment"))
    ctx = bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    ctx["readOnlyRootFilesytem"] = ctx.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_custom_resources_have_the_operator_shape() -> None:
    monitor = _by_kind("ServiceMonitor")
    service = _by_kind("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    rule = _by_kind("PrometheusRule")
    assert rule["spec"]["groups"] and all(g["rules"] for g in rule["spec"]["groups"])


def test_deployment_fits_the_image_service_config_and_secret(tmp_path: Path) -> None:
    deployment = _by_kind("Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _by_kind("Service")["spec"]["selector"].items() <= labels.items()
    assert _by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        labels.items())
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    (container,) = spec["containers"]
    for c in [*spec["containers"], *spec.get("initContainers", [])]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][kind].keys()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == 8080

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/var/lib/exfilwatch"]]["persistentVolumeClaim"]["claimName"] == (
        _by_kind("PersistentVolumeClaim")["metadata"]["name"])
    assert "emptyDir" in volumes[mounts["/tmp"]]  # numba's cache on a read-only root
    configmap = _by_kind("ConfigMap")
    assert volumes[mounts["/etc/exfilwatch"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert container["args"] == ["serve", "--config", "/etc/exfilwatch/exfilwatch.toml"]

    # the ConfigMap is a valid config, and everything it writes is on the state volume
    toml = tmp_path / "exfilwatch.toml"
    toml.write_text(configmap["data"]["exfilwatch.toml"])
    settings = config.load(toml)
    assert settings.api.host == "0.0.0.0" and settings.api.port == 8080
    for path in (settings.state_dir, settings.models_dir, *(s.path for s in settings.sources)):
        assert Path("/var/lib/exfilwatch") in (path, *path.parents), path

    # every secret the pod reads is in the example Secret, and the sinks there are valid
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    refs = {e["valueFrom"]["secretKeyRef"]["key"]: e["name"] for e in container["env"]}
    assert refs == {"sinks.json": "EXFILWATCH_SINKS"}
    assert refs.keys() <= secret["stringData"].keys()

    # the tokens are files of the Secret, required (not optional), where the config names them
    tokens = volumes[mounts["/run/secrets/exfilwatch"]]["secret"]
    assert tokens["secretName"] == secret["metadata"]["name"] and not tokens.get("optional")
    files = {item["path"]: item["key"] for item in tokens["items"]}
    assert files == {"api-token": "api-token", "read-token": "read-token"}
    assert set(files.values()) <= secret["stringData"].keys()
    assert settings.api.token_file == Path("/run/secrets/exfilwatch/api-token")
    assert settings.api.read_token_file == Path("/run/secrets/exfilwatch/read-token")
    assert settings.api.token is None and settings.api.read_token is None
    assert tokens["defaultMode"] & 0o040  # readable by the pod's fsGroup, the service's group


def test_example_secret_sinks_are_valid_settings(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    monkeypatch.setenv("EXFILWATCH_SINKS", secret["stringData"]["sinks.json"])
    toml = tmp_path / "exfilwatch.toml"
    toml.write_text(_by_kind("ConfigMap")["data"]["exfilwatch.toml"])
    settings = config.load(toml)
    assert [s.kind for s in settings.sinks] == ["webhook", "alertmanager"]


def test_the_example_secret_applied_as_it_is_stops_the_service(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Its token values are empty placeholders: mounted as they are, the service refuses them
    instead of serving with a token anyone can read in this repository."""
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for key in ("api-token", "read-token"):
        (tmp_path / key).write_text(secret["stringData"][key])
    monkeypatch.setenv("EXFILWATCH_API__TOKEN_FILE", str(tmp_path / "api-token"))
    monkeypatch.setenv("EXFILWATCH_API__READ_TOKEN_FILE", str(tmp_path / "read-token"))
    toml = tmp_path / "exfilwatch.toml"
    toml.write_text(_by_kind("ConfigMap")["data"]["exfilwatch.toml"])
    settings = config.load(toml)
    with pytest.raises(ConfigError, match="api-token is empty"):
        settings.api_token()
    with pytest.raises(ConfigError, match="read-token is empty"):
        settings.api_read_token()
    (tmp_path / "api-token").write_text("0f3c9a\n")  # a real value works
    assert settings.api_token() == "0f3c9a"


def test_image_config_is_valid() -> None:
    settings = config.load(DEPLOY / "exfilwatch.toml")
    assert settings.api.host == "0.0.0.0"
    assert settings.models_dir == Path("/models")
    assert (ROOT / "models" / settings.model / "current").exists()
