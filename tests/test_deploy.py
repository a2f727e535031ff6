"""The deployment files in ``deploy/`` and ``.dockerignore`` hang together.

Nothing here starts a container or a cluster: the files are parsed and cross-checked the
way ``kubectl``, ``docker compose`` and ``systemd`` would read them, because a mistake in
them (a Secret that does not exist, a probe on the wrong port, an environment variable
the node ignores) only shows once an operator installs the node. Where the real tools
are installed (``systemd-analyze``, ``docker compose``) they check the files as well.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import CONFIG_ENV, ENV_PREFIX, FLAT_ENV, Settings, load_settings
from tests.support import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
CONFIG_PATH = "/etc/cxr-node/node.toml"
DICOM_PORT, HTTP_PORT = 11112, 8080


# --- helpers ------------------------------------------------------------------------


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    """Every object of every manifest listed by the kustomization, with its file."""
    objects: list[tuple[Path, dict[str, Any]]] = []
    for name in kustomization()["resources"]:
        path = K8S / name
        objects.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def objects_of(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_objects() if doc["kind"] == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return data


@dataclass
class Instruction:
    keyword: str
    arguments: str
    stage: int  # index of the FROM it belongs to; -1 before the first FROM


def dockerfile() -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split()), stage))
    return instructions


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as section → [(key, value)], repeated keys kept in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def last(section: list[tuple[str, str]], key: str) -> str | None:
    values = [value for k, value in section if k == key]
    return values[-1] if values else None


def all_values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for k, value in section if k == key]


def deploy_env() -> Iterator[tuple[str, str, str]]:
    """Every ``DICOM_NODE_*`` variable the deploy files set: (where, name, value)."""
    for instruction in dockerfile():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                yield "Dockerfile", name, value
    for path in SYSTEMD.glob("*.service"):
        for _, value in unit(path)["Service"]:
            if value.startswith(ENV_PREFIX):
                name, _, text = value.partition("=")
                yield path.name, name, text
    for line in (SYSTEMD / "env.example").read_text().splitlines():
        if line.startswith(ENV_PREFIX):
            name, _, value = line.partition("=")
            yield "env.example", name, value
    for service_name, service in compose()["services"].items():
        for name, value in (service.get("environment") or {}).items():
            yield f"compose {service_name}", name, str(value)
    secrets = {name: doc.get("stringData", {}) for name, doc in objects_of("Secret").items()}
    for deployment_name, deployment in objects_of("Deployment").items():
        for container in containers(deployment):
            for entry in container.get("env", []):
                value = entry.get("value")
                if value is None:
                    ref = entry["valueFrom"]["secretKeyRef"]
                    value = secrets[ref["name"]][ref["key"]]
                yield f"k8s {deployment_name}", entry["name"], value


def setting_of(name: str) -> tuple[str, str]:
    """(section, key) a ``DICOM_NODE_*`` variable sets, as the config documents it."""
    if name in FLAT_ENV:
        return FLAT_ENV[name]
    section, sep, key = name.removeprefix(ENV_PREFIX).lower().partition("__")
    assert sep and key, f"{name} is neither a documented short name nor SECTION__KEY"
    return section, key


def same_value(actual: object, text: str) -> bool:
    if isinstance(actual, bool):
        return actual == (text.strip().lower() in ("1", "true", "yes", "on"))
    return str(actual) == text


# --- Kubernetes ---------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = kustomization()["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present
    assert len(listed) == len(set(listed)), "a manifest is listed twice"


def test_every_k8s_object_is_complete_and_unique() -> None:
    seen: set[tuple[str, str]] = set()
    for path, doc in k8s_objects():
        for field in ("apiVersion", "kind"):
            assert doc.get(field), f"{path.name}: object without {field}"
        name = (doc.get("metadata") or {}).get("name")
        assert name, f"{path.name}: {doc['kind']} without metadata.name"
        assert (doc["kind"], name) not in seen, f"{doc['kind']} {name} defined twice"
        seen.add((doc["kind"], name))
    kinds = {kind for kind, _ in seen}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
    } <= kinds


def test_deployment_selectors_match_their_pods() -> None:
    deployments = objects_of("Deployment")
    assert set(deployments) == {"cxr-node-listener", "cxr-node-worker"}
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}: selector does not match its pods"
    # The two must not select each other's pods, or the Service would mix them.
    listener, worker = (d["spec"]["selector"]["matchLabels"] for d in deployments.values())
    assert listener != worker


def test_deployments_run_the_listener_and_the_worker() -> None:
    deployments = objects_of("Deployment")
    (listener,) = containers(deployments["cxr-node-listener"])
    (worker,) = containers(deployments["cxr-node-worker"])
    assert listener["args"] == ["serve", "--no-workers"]
    assert worker["args"] == ["worker"]
    assert deployments["cxr-node-worker"]["spec"]["replicas"] >= 2


def test_pods_reference_existing_secrets_configmaps_and_claims() -> None:
    secrets, configmaps = objects_of("Secret"), objects_of("ConfigMap")
    claims = objects_of("PersistentVolumeClaim")
    for name, deployment in objects_of("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for volume in volumes.values():
            if "secret" in volume:
                secret = secrets.get(volume["secret"]["secretName"])
                assert secret is not None, f"{name}: no Secret {volume['secret']}"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret["stringData"], f"{name}: {item}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{name}: {volume}"
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{name}: no PersistentVolumeClaim {claim}"
        for container in containers(deployment):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: mount of unknown volume {mount}"
            for entry in container.get("env", []):
                ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], f"{name}: {ref}"
            database = [e for e in container["env"] if e["name"] == "DICOM_NODE_DATABASE_URL"]
            assert database and "secretKeyRef" in database[0]["valueFrom"], (
                f"{name}: the database URL (with its password) must come from a Secret"
            )


def test_spool_is_shared_read_write_many_by_both_deployments() -> None:
    (claim,) = objects_of("PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, deployment in objects_of("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        spool = [v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        (container,) = containers(deployment)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/var/lib/cxr-node/spool") in spool, f"{name}: spool not on the PVC"


def test_pods_are_locked_down_with_writable_volumes_where_the_node_writes() -> None:
    for name, deployment in objects_of("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in containers(deployment):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            # Spool, home (logs, generated files) and /tmp; the rest of the root is read-only.
            assert {"/var/lib/cxr-node/spool", "/var/lib/cxr-node", "/tmp"} <= writable, name


def test_probes_only_where_http_is_served_and_resources() -> None:
    deployments = objects_of("Deployment")
    (listener,) = containers(deployments["cxr-node-listener"])
    ports = {p["name"]: p["containerPort"] for p in listener["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        check = listener[probe]["httpGet"]
        assert check["path"] == "/healthz", probe
        assert check["port"] in ports or check["port"] in ports.values()
    # `dicom-node worker` serves no HTTP: an HTTP probe would restart it forever.
    (worker,) = containers(deployments["cxr-node-worker"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert "httpGet" not in worker.get(probe, {}), probe
    assert "ports" not in worker
    for name, deployment in deployments.items():
        for container in containers(deployment):
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"]
            assert "memory" in resources["limits"], f"{name}: no memory limit"
    (worker,) = containers(objects_of("Deployment")["cxr-node-worker"])
    # The node with both models stays ≤ 1.5 GiB resident (bench/run_all.py): the limit
    # must leave that much, and the request must reserve it.
    assert memory_mib(worker["resources"]["limits"]["memory"]) >= 1536
    assert memory_mib(worker["resources"]["requests"]["memory"]) >= 1536


def memory_mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)", quantity)
    assert match, f"unexpected memory quantity {quantity!r}"
    return float(match[1]) * units[match[2]]


def test_service_ports_reach_container_ports_of_the_listener() -> None:
    deployments = objects_of("Deployment")
    for name, service in objects_of("Service").items():
        selector = service["spec"]["selector"]
        selected = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert [d["metadata"]["name"] for d in selected] == ["cxr-node-listener"], name
        ports = {p["name"]: p["containerPort"] for c in containers(selected[0]) for p in c["ports"]}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"{name}: {target} not exposed"
        numbers = {p["port"] for p in service["spec"]["ports"]}
        assert {DICOM_PORT, HTTP_PORT} <= numbers


def test_hpa_scales_the_workers_on_queued_jobs() -> None:
    (hpa,) = objects_of("HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "cxr-node-worker")
    assert target["name"] in objects_of("Deployment")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "cxr_node_jobs"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"state": "queued"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_configmap_holds_a_valid_node_config_on_the_service_ports(tmp_path: Path) -> None:
    (configmap,) = objects_of("ConfigMap").values()
    path = tmp_path / "node.toml"
    path.write_text(configmap["data"]["node.toml"])
    settings = load_settings(path)
    assert settings.node.port == DICOM_PORT and settings.http.port == HTTP_PORT
    assert [d.name for d in settings.destinations] == ["pacs"]
    for name, deployment in objects_of("Deployment").items():
        (container,) = containers(deployment)
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env[CONFIG_ENV] == CONFIG_PATH, name
        config_volume = next(
            v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v
        )
        assert f"{mounts[config_volume]}/node.toml" == CONFIG_PATH, name
        if name == "cxr-node-listener":
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {"dicom": settings.node.port, "http": settings.http.port}


# --- compose ------------------------------------------------------------------------


def test_compose_services_reference_what_is_defined() -> None:
    data = compose()
    volumes, secrets, configs = (
        set(data.get(key) or {}) for key in ("volumes", "secrets", "configs")
    )
    services = data["services"]
    assert {"postgres", "orthanc", "listener", "worker"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name}: undefined volume {source}"
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in secrets, f"{name}: undefined secret {source}"
        for config in service.get("configs", []):
            source = config if isinstance(config, str) else config["source"]
            assert source in configs, f"{name}: undefined config {source}"
    for entry in [*data["secrets"].values(), *data["configs"].values()]:
        assert entry["file"].startswith("./"), entry
    for name in ("listener", "worker"):
        mounts = [v.split(":") for v in services[name]["volumes"]]
        assert ["spool", "/var/lib/cxr-node/spool"] in mounts, f"{name}: spool not shared"
    assert services["worker"]["command"] == ["worker"]
    assert services["listener"]["command"] == ["serve", "--no-workers"]
    assert services["worker"]["deploy"]["replicas"] == 2
    # Workers serve no HTTP: the image's /healthz check would mark them unhealthy.
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_compose_waits_on_health_checks() -> None:
    services = compose()["services"]
    image_has_healthcheck = any(i.keyword == "HEALTHCHECK" for i in dockerfile())
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} → {dependency}"
            other = services[dependency]
            built_here = "build" in other and other["build"]["dockerfile"].endswith(
                "deploy/docker/Dockerfile"
            )
            has_check = "healthcheck" in other or (built_here and image_has_healthcheck)
            assert has_check, f"{name} waits for {dependency}, which has no health check"
            assert not (other.get("healthcheck") or {}).get("disable"), dependency


def test_compose_keeps_secrets_out_of_the_file() -> None:
    data = compose()
    text = (COMPOSE / "compose.yaml").read_text()
    assert "CHANGE_ME" not in text
    postgres = data["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert "POSTGRES_PASSWORD" not in postgres["environment"]
    for name in ("listener", "worker"):
        service = data["services"][name]
        assert "DICOM_NODE_DATABASE_URL" not in service["environment"], name
        assert service["env_file"] == ["./secrets/node.env"], name
        token_file = service["environment"]["DICOM_NODE_HTTP__TOKEN_FILE"]
        assert token_file == "/run/secrets/api_token" and "api_token" in service["secrets"]
    # The secret files themselves are never committed.
    ignored = (COMPOSE / ".gitignore").read_text().split()
    assert "secrets/" in ignored
    assert "deploy/compose/secrets/" in (REPO_ROOT / ".dockerignore").read_text().split()


def test_compose_node_and_orthanc_configs_point_at_each_other(tmp_path: Path) -> None:
    settings = load_settings(COMPOSE / "node.toml")
    orthanc = yaml.safe_load((COMPOSE / "orthanc.json").read_text())  # JSON is YAML
    (pacs,) = settings.destinations
    assert (pacs.host, pacs.port, pacs.ae_title) == (
        "orthanc",
        orthanc["DicomPort"],
        orthanc["DicomAet"],
    )
    node = orthanc["DicomModalities"]["cxr-node"]
    assert (node["AET"], node["Host"], node["Port"]) == (
        settings.node.ae_title,
        "listener",
        settings.node.port,
    )
    services = compose()["services"]
    targets = {c["source"]: c["target"] for c in services["listener"]["configs"]}
    assert targets["node_toml"] == CONFIG_PATH == services["listener"]["environment"][CONFIG_ENV]
    assert f"{settings.node.port}:{settings.node.port}" in services["listener"]["ports"]


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return probe.returncode == 0


def test_docker_compose_accepts_the_file_where_installed(tmp_path: Path) -> None:
    """``docker compose config`` (where the plugin exists) on a copy with dummy secrets;
    without it the structural checks above are what stands."""
    copy = tmp_path / "compose"
    shutil.copytree(COMPOSE, copy)
    (copy / "secrets").mkdir(exist_ok=True)
    for name in ("db_password", "api_token"):
        (copy / "secrets" / name).write_text("dummy\n")
    (copy / "secrets" / "node.env").write_text(
        "DICOM_NODE_DATABASE_URL=postgresql+psycopg2://cxr_node:dummy@postgres:5432/cxr_node\n"
    )
    assert yaml.safe_load((copy / "compose.yaml").read_text()) == compose()
    if docker_compose_available():
        result = subprocess.run(
            ["docker", "compose", "-f", str(copy / "compose.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr


# --- Dockerfile ---------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_pinned_torch_and_a_cuda_switch() -> None:
    instructions = dockerfile()
    args = {i.arguments.split("=")[0]: i.arguments for i in instructions if i.keyword == "ARG"}
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    assert instructions[0].keyword == "ARG" and instructions[0].stage == -1
    assert all("${PYTHON_IMAGE}" in f.arguments for f in froms)
    assert args["PYTHON_IMAGE"] == "PYTHON_IMAGE=python:3.11-slim"
    assert args["TORCH_INDEX"] == "TORCH_INDEX=https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == "TORCH_VERSION=2.13.0"
    runs = " ".join(i.arguments for i in instructions if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in runs
    assert "cu126" in DOCKERFILE.read_text(), "the CUDA build argument is documented"


def test_dockerfile_runs_as_non_root_with_health_check_and_ports() -> None:
    instructions = dockerfile()
    final = max(i.stage for i in instructions)
    runtime = [i for i in instructions if i.stage == final]
    (user,) = [i.arguments for i in runtime if i.keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "Kubernetes checks runAsNonRoot on a numeric USER"
    pods = [d["spec"]["template"]["spec"] for d in objects_of("Deployment").values()]
    assert all(pod["securityContext"]["runAsUser"] == int(uid) for pod in pods)
    (health,) = [i.arguments for i in runtime if i.keyword == "HEALTHCHECK"]
    assert "/healthz" in health and "DICOM_NODE_HTTP_PORT" in health and "'8080'" in health
    exposed = {int(p) for i in runtime if i.keyword == "EXPOSE" for p in i.arguments.split()}
    assert exposed == {DICOM_PORT, HTTP_PORT}
    (entrypoint,) = [i.arguments for i in runtime if i.keyword == "ENTRYPOINT"]
    (cmd,) = [i.arguments for i in runtime if i.keyword == "CMD"]
    assert yaml.safe_load(entrypoint) == ["dicom-node"] and yaml.safe_load(cmd) == ["serve"]


def test_docker_build_context_has_the_sources_and_not_the_local_state() -> None:
    ignored = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for entry in (".git", ".venv", "var/", "bench/results/"):
        assert entry in ignored
    for instruction in dockerfile():
        if instruction.keyword == "COPY" and "--from" not in instruction.arguments:
            *sources, _ = instruction.arguments.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY of missing {source}"
                assert not any(source.startswith(e.rstrip("/")) for e in ignored), source


# --- systemd ------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "Restart": "on-failure",
    "StateDirectory": "cxr-node",
    "EnvironmentFile": "/etc/cxr-node/env",
}


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("cxr-node-listener.service", "dicom-node serve --no-workers"),
        ("cxr-node-worker@.service", "dicom-node worker"),
    ],
)
def test_systemd_units_are_hardened_and_run_the_node(name: str, command: str) -> None:
    sections = unit(SYSTEMD / name)
    service = sections["Service"]
    exec_start = last(service, "ExecStart")
    assert exec_start is not None and exec_start.split("/")[-1] == command
    for key, value in HARDENING.items():
        assert last(service, key) == value, f"{name}: {key}"
    user = last(service, "User")
    assert user and user != "root" and not last(service, "DynamicUser")
    assert f"{CONFIG_ENV}={CONFIG_PATH}" in all_values(service, "Environment")
    assert last(service, "WorkingDirectory") == "/var/lib/cxr-node"
    for key in ("MemoryMax", "LimitNOFILE"):
        assert last(service, key), f"{name}: no {key}"
    # An invalid configuration exits 2: restarting in a loop cannot fix it.
    assert last(service, "RestartPreventExitStatus") == "2"
    assert last(sections["Unit"], "PartOf") == "cxr-node.target"
    assert last(sections["Install"], "WantedBy") == "cxr-node.target"
    text = (SYSTEMD / name).read_text()
    if "worker" in name:
        assert "PrivateDevices=no" in text, "how to give a CUDA worker its GPU is documented"
    else:
        assert "CAP_NET_BIND_SERVICE" in text, "how to bind port 104 is documented"


def test_systemd_target_starts_listener_and_a_worker() -> None:
    target = unit(SYSTEMD / "cxr-node.target")
    wants = " ".join(all_values(target["Unit"], "Wants")).split()
    assert "cxr-node-listener.service" in wants and "cxr-node-worker@1.service" in wants
    assert last(target["Install"], "WantedBy") == "multi-user.target"
    sysusers = (SYSTEMD / "cxr-node.sysusers.conf").read_text()
    user = last(unit(SYSTEMD / "cxr-node-listener.service")["Service"], "User")
    assert re.search(rf"^u {user} ", sysusers, re.MULTILINE), "the dedicated user is declared"


def test_systemd_analyze_verify_where_installed(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (where installed) on copies whose ExecStart names an
    executable that exists here, since the units point at the installed /opt path."""
    fake = tmp_path / "dicom-node"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    copies = []
    for path in sorted(SYSTEMD.glob("cxr-node*")):
        if path.suffix not in (".service", ".target"):
            continue
        text = path.read_text().replace("/opt/cxr-node/venv/bin/dicom-node", str(fake))
        copy = tmp_path / path.name
        copy.write_text(text)
        copies.append(copy)
    assert [c.name for c in copies] == [
        "cxr-node-listener.service",
        "cxr-node-worker@.service",
        "cxr-node.target",
    ]
    if shutil.which("systemd-analyze") is None:
        assert all(unit(copy)["Unit"] for copy in copies)
        return
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, copies)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0, result.stderr
    assert "cxr-node" not in result.stderr, result.stderr


# --- the node accepts every variable the deploy files set ---------------------------


def test_every_dicom_node_variable_in_deploy_files_takes_effect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = [
        (where, name, value)
        for where, name, value in deploy_env()
        if name.startswith(ENV_PREFIX) and name != CONFIG_ENV
    ]
    names = {name for _, name, _ in found}
    # The ones each kind of deployment relies on are really there.
    assert {
        "DICOM_NODE_DATABASE_URL",
        "DICOM_NODE_HTTP_PORT",
        "DICOM_NODE_HTTP__HOST",
        "DICOM_NODE_SPOOL_DIR",
        "DICOM_NODE_HTTP__TOKEN_FILE",
    } <= names
    for where, name, value in found:
        section, key = setting_of(name)
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            settings = load_settings()
        assert section in Settings.model_fields, f"{where}: {name}: no section [{section}]"
        actual = getattr(getattr(settings, section), key)
        assert same_value(actual, value), (
            f"{where}: {name}={value!r} gave {section}.{key}={actual!r}"
        )


def test_config_file_variable_names_the_mounted_config() -> None:
    for where, name, value in deploy_env():
        if name == CONFIG_ENV:
            assert value == CONFIG_PATH, where


def test_every_dicom_node_name_mentioned_in_deploy_is_a_real_setting() -> None:
    """Comments and the README count too: an operator copies names from them."""
    mentioned: dict[str, str] = {}
    for path in [*DEPLOY.rglob("*"), REPO_ROOT / ".dockerignore"]:
        if path.is_file():
            for name in re.findall(r"\bDICOM_NODE_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
                mentioned.setdefault(name, str(path.relative_to(REPO_ROOT)))
    assert len(mentioned) >= 10
    for name, where in mentioned.items():
        if name == CONFIG_ENV:
            continue
        section, key = setting_of(name)
        fields = Settings.model_fields
        assert section in fields, f"{where}: {name}: no section [{section}]"
        model = fields[section].annotation
        assert model is not None and key in getattr(model, "model_fields", {}), (
            f"{where}: {name}: [{section}] has no key {key!r}"
        )
