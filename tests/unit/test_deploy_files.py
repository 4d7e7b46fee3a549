"""The deploy/ files agree with the code and with each other.

No Docker engine or cluster runs here, so the compose and Kubernetes files are
never started in the suite. What can be checked without one is checked: the
broker config each ships loads with the broker's own loader, and every file
that config names lies where the compose service or the pod mounts something,
under the name the README's commands create it with.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

#: An absolute path inside a quoted TOML value (sqlite:////x counts as /x).
_PATH = re.compile(r'"(?:sqlite:///)?(/[A-Za-z0-9_./-]+)"')


def _paths(toml_text: str) -> set[str]:
    return {m.group(1) for m in _PATH.finditer(toml_text)}


def _load_relocated(text: str, tmp_path: Path) -> Any:
    """load_config on ``text`` with every absolute path moved under ``tmp_path``.

    Files the config reads at load (TLS pair, password files) exist there with
    placeholder content, so what is checked is the config itself (not the
    placeholder certificate: the real one comes from the deployment's Secret).
    """
    for path in sorted(_paths(text), key=len, reverse=True):
        moved = tmp_path / path.lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        if path.startswith(("/run/", "/etc/")):  # secrets and TLS: read at load
            moved.write_text("x\n")
        text = text.replace(f'"{path}"', f'"{moved}"').replace(
            f'"sqlite:///{path}"', f'"sqlite:///{moved}"')
    config_file = tmp_path / "broker.toml"
    config_file.write_text(text)
    return load_config(config_file, check_tls=False)


def _under(path: str, mounts: set[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_compose_config_loads_and_finds_its_secrets_and_volumes(tmp_path: Path) -> None:
    text = (DEPLOY / "compose" / "broker.toml").read_text()
    config = _load_relocated(text, tmp_path)
    assert config.server.tls and "pg" in config.mounts

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    broker = compose["services"]["broker"]
    secrets = set(broker["secrets"])
    assert secrets <= set(compose["secrets"])
    targets = {v.split(":")[1] for v in broker["volumes"]}
    # The config is where the image's CMD looks for it.
    assert "/etc/broker/broker.toml" in targets
    assert "/etc/broker/broker.toml" in (DEPLOY / "Dockerfile").read_text()
    for path in _paths(text):
        if path.startswith("/run/secrets/"):
            assert path.removeprefix("/run/secrets/") in secrets, f"{path}: not a broker secret"
        else:
            assert _under(path, targets), f"{path}: on no volume of the broker service"
    # The PostgreSQL init script hands out the admin the config connects as.
    admin = config.mounts["pg"].options["connection_url"].split("//", 1)[1].split("@", 1)[0]
    assert admin in (DEPLOY / "compose" / "postgres-init" / "10-broker-admin.sh").read_text()


def _kubernetes(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())
    return doc


def test_kubernetes_config_loads_and_every_path_is_mounted(tmp_path: Path) -> None:
    text = _kubernetes("configmap.yaml")["data"]["broker.toml"]
    config = _load_relocated(text, tmp_path)
    assert config.server.tls and "pg" in config.mounts
    assert tomllib.loads(text)["storage"]["url"].startswith("sqlite:")

    deployment = _kubernetes("deployment.yaml")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "broker"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert container["args"][-1] == "/etc/broker/broker.toml"
    assert volumes[mounts["/etc/broker"]["name"]]["configMap"]["name"] == "broker-config"
    # The SQLite store allows exactly one pod at a time.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    readme = (DEPLOY / "README.md").read_text()
    for path in _paths(text):
        mount = max((m for m in mounts if _under(path, {m})), key=len, default=None)
        assert mount is not None, f"{path}: under no volumeMount of the broker container"
        secret = volumes[mounts[mount]["name"]].get("secret")
        if secret is not None:
            # The file is a key of the Secret: the README must create it under that name.
            key = path.removeprefix(mount.rstrip("/") + "/")
            commands = [line for line in readme.splitlines()
                        if f" {secret['secretName']} " in f"{line} " and "kubectl create" in line]
            assert commands, f"the README never creates Secret {secret['secretName']}"
            created = commands[0]
            assert (f"{key}=" in created
                    or ("create secret tls" in created and key in ("tls.crt", "tls.key"))), (
                f"{path}: Secret {secret['secretName']} is not created with key {key!r}")


@pytest.mark.parametrize("name", sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")))
def test_kubernetes_files_parse_and_are_listed_by_kustomize(name: str) -> None:
    doc = _kubernetes(name)
    kustomization = _kubernetes("kustomization.yaml")
    if name != "kustomization.yaml":
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        assert name in kustomization["resources"], f"{name} is not applied by kubectl -k"
