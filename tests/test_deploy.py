"""The deployment files are the tested ones: Dockerfile (hadolint, and its install and start steps run for real in a
fresh virtual environment), deploy/kubernetes (rendered and checked against the Kubernetes schemas) and deploy/compose.

No kustomize binary can be installed here, so the layout is kept plain (overlays only list resources) and rendered by
``render`` below, which refuses any kustomization field it does not understand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from conftest import T1, basic_auth
from serve_process import ServeProcess, poll_until

from st_proxy.config import from_mapping, load_file
from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS, SimTenant

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose"
OVERLAYS = ("sidecar", "gateway", "monitoring")
# 1.29: the first release with native sidecars on by default; and the newest schemas the package bundles.
KUBE_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
RENDERER_FIELDS = {"apiVersion", "kind", "resources"}
ADMIN_PORT_NAME = "st-proxy-admin"


# -- helpers -----------------------------------------------------------------------------------------------------
def render(directory: Path) -> list[dict[str, Any]]:
    """What `kustomize build` gives for a kustomization that only lists resources (files or directories)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - RENDERER_FIELDS
    assert not unsupported, f"{directory}: the test renderer does not support {sorted(unsupported)}"
    assert kustomization["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def one(docs: list[dict], kind: str) -> dict:
    """The one document of this kind; where a kit has several (the gateway's Redis), the proxy's own (st-proxy)."""
    found = [d for d in docs if d["kind"] == kind]
    if len(found) > 1:
        found = [d for d in found if d["metadata"]["name"] == "st-proxy"]
    [doc] = found
    return doc


def file_refs(node: object) -> list[str]:
    if isinstance(node, dict):
        if set(node) == {"file"}:
            return [node["file"]]
        return [ref for value in node.values() for ref in file_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in file_refs(value)]
    return []


def with_files_in(node: object, mapping) -> object:
    """The config document with every ``{file: X}`` replaced by ``{file: mapping(X)}``."""
    if isinstance(node, dict):
        if set(node) == {"file"}:
            return {"file": str(mapping(node["file"]))}
        return {k: with_files_in(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [with_files_in(v, mapping) for v in node]
    return node


def proxy_container(pod_spec: dict) -> dict:
    containers = pod_spec.get("initContainers", []) + pod_spec["containers"]
    [container] = [c for c in containers if c["name"] == "st-proxy"]
    return container


def embedded_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


# -- Dockerfile --------------------------------------------------------------------------------------------------
def test_the_dockerfile_passes_hadolint_without_a_single_warning():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_the_image_is_two_pinned_slim_stages_running_st_proxy_as_a_numeric_non_root_user():
    steps = dockerfile()
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2 and all(re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+ AS \w+", f) for f in froms)
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][1] :]
    [user] = [args for op, args in runtime if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert ("EXPOSE", "8080 9090") in runtime
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    [env] = [args for op, args in runtime if op == "ENV" and "PYTHONDONTWRITEBYTECODE" in args]
    assert "PYTHONDONTWRITEBYTECODE=1" in env.split()
    assert json.loads(next(a for op, a in runtime if op == "ENTRYPOINT")) == ["st-proxy"]
    assert not [a for op, a in runtime if op == "RUN" and re.search(r"\bpip\b|apt-get|gcc", a)]  # no build tools


def test_the_build_context_the_dockerignore_leaves_holds_everything_the_dockerfile_copies():
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    included = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for op, args in dockerfile():
        if op == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                source = source.rstrip("/")
                assert (ROOT / source).exists(), source
                assert any(source == inc or source.startswith(inc + "/") for inc in included), source


def test_the_image_config_validates_and_listens_on_every_interface(tmp_path):
    raw = yaml.safe_load((ROOT / "deploy" / "docker" / "config.yaml").read_text())
    assert raw["listen"].startswith("0.0.0.0:") and raw["admin_listen"].startswith("0.0.0.0:")
    _check_config_with_secret_files(raw, tmp_path)


@pytest.fixture
async def installed(tmp_path_factory) -> Path:
    """The Dockerfile's build stage, for real: the build context copied, then deploy/docker/install.sh run on it."""
    work = tmp_path_factory.mktemp("image")
    steps = dockerfile()
    build = steps[: [i for i, (op, _) in enumerate(steps) if op == "FROM"][1]]
    [workdir] = [args for op, args in build if op == "WORKDIR"]
    context = work / workdir.lstrip("/")
    script = None
    for op, args in build:
        if op == "COPY":
            *sources, dest = args.split()
            for source in sources:
                if source == "deploy/docker/install.sh":
                    script = dest
                    continue
                target = context / dest.rstrip("/") if not dest.endswith("./") else context
                target.mkdir(parents=True, exist_ok=True)
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(src, target / src.name)
    [run] = [args for op, args in build if op == "RUN"]
    assert script is not None and run.split()[:2] == ["sh", script], "the build stage must run the install script"
    source, venv = run.split()[2:4]
    assert (source, venv) == (workdir, "/opt/st-proxy")
    target = work / "opt" / "st-proxy"
    result = subprocess.run(
        ["sh", str(ROOT / "deploy" / "docker" / "install.sh"), str(context), str(target), str(work / "wheels")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return target


IMAGE_CLIENT_SECRET = "image-test-client-secret-0c1d2e3f4a5b"


async def test_the_installed_image_checks_its_config_serves_through_the_simulator_and_stops_cleanly_on_sigterm(
    installed, make_simulator, tmp_path
):
    tenant = SimTenant("1234567", "cid.replace-me", "cs1.image-test-secret")
    sim = await make_simulator(tenants=[tenant])
    assert not (installed / "bin" / "pip").exists()  # the runtime venv cannot install anything

    raw = yaml.safe_load((ROOT / "deploy" / "docker" / "config.yaml").read_text())
    raw = with_files_in(raw, lambda p: tmp_path / p.lstrip("/"))
    for ref in file_refs(raw):
        Path(ref).parent.mkdir(parents=True, exist_ok=True)
        value = DEMO_APP_KEY if ref.endswith("app_key") else tenant.client_secret
        Path(ref).write_text((IMAGE_CLIENT_SECRET if "/client." in ref else value) + "\n")
    raw.update(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", shutdown={"drain_seconds": 0.2})
    raw["environments"] = {"production": {"auth_url": sim.auth_url, "api_url": sim.base_url}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))

    st_proxy = installed / "bin" / "st-proxy"
    check = subprocess.run(
        [str(st_proxy), "check-config", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert tenant.client_secret not in check.stdout + check.stderr

    entrypoint = json.loads(next(a for op, a in dockerfile() if op == "ENTRYPOINT"))
    cmd = json.loads(next(a for op, a in dockerfile() if op == "CMD"))
    assert cmd[cmd.index("--config") + 1] == "/etc/st-proxy/config.yaml"
    cmd[cmd.index("--config") + 1] = str(config)
    before = sorted(p for p in installed.rglob("*"))
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    child = await ServeProcess.start(
        config,
        command=[str(installed / "bin" / entrypoint[0]), *cmd],
        cwd=run_dir,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(child.admin_url + "/healthz") as resp:
                assert resp.status == 200

            async def ready() -> bool:
                async with session.get(child.admin_url + "/readyz") as resp:
                    return resp.status == 200

            await poll_until(ready, what="readiness")
            url = f"{child.url}/crm/v2/tenant/{tenant.tenant_id}/customers?pageSize=2"
            async with session.get(url) as resp:
                assert resp.status == 401  # the image's config has a client: callers authenticate
            async with session.get(url, headers=basic_auth("app", IMAGE_CLIENT_SECRET)) as resp:
                assert resp.status == 200
                assert len((await resp.json())["data"]) == 2
        child.send(signal.SIGTERM)
        assert await child.wait_exit() == 0
    finally:
        await child.close()
    assert sorted(p for p in installed.rglob("*")) == before  # nothing written into the install (read-only root)
    assert list(run_dir.iterdir()) == []


# -- Kubernetes --------------------------------------------------------------------------------------------------
def test_every_kustomization_uses_only_fields_the_test_renderer_supports():
    found = sorted(p.parent.name for p in KUBE.rglob("kustomization.yaml"))
    assert found == sorted(OVERLAYS)
    for name in OVERLAYS:
        assert render(KUBE / name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_is_valid_against_the_kubernetes_schemas(overlay):
    for doc in render(KUBE / overlay):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no bundled schema; checked by its own test below
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_would_catch_a_misspelt_field():
    deployment = one(render(KUBE / "sidecar"), "Deployment")
    proxy_container(deployment["spec"]["template"]["spec"])["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_the_credentials_secret_example_is_valid_and_holds_every_file_the_configs_name(tmp_path):
    secret = yaml.safe_load((KUBE / "secret.example.yaml").read_text())
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(secret, version, strict=True)
    for overlay in ("sidecar", "gateway"):
        docs = render(KUBE / overlay)
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in proxy_container(pod)["volumeMounts"]}
        [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]]
        mount = mounts[volume["name"]]
        for ref in file_refs(embedded_config(docs)):
            assert ref.startswith(mount + "/") and ref[len(mount) + 1 :] in secret["stringData"], ref


@pytest.mark.parametrize("overlay", ["sidecar", "gateway"])
def test_the_configmap_config_validates_with_its_secret_files_present(overlay, tmp_path):
    _check_config_with_secret_files(embedded_config(render(KUBE / overlay)), tmp_path)


def _check_config_with_secret_files(raw: dict, tmp_path: Path) -> None:
    raw = with_files_in(raw, lambda p: tmp_path / p.lstrip("/"))
    for ref in file_refs(raw):
        Path(ref).parent.mkdir(parents=True, exist_ok=True)
        Path(ref).write_text("placeholder-value-as-long-as-a-real-client-secret\n")
    config = from_mapping(raw, {})
    assert config.tenants
    # The only warning allowed is the one about a data port beyond loopback, which these configs need and explain.
    assert all(w.startswith("listen: 0.0.0.0:") for w in config.warnings), config.warnings


def test_the_sidecar_is_a_native_sidecar_probed_on_the_admin_port_hardened_and_fed_from_configmap_and_secret():
    docs = render(KUBE / "sidecar")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    proxy = proxy_container(pod)
    assert proxy in pod["initContainers"] and proxy["restartPolicy"] == "Always"
    config = embedded_config(docs)
    assert config["listen"].startswith("127.0.0.1:")  # the data port never leaves the pod
    _assert_proxy_container(pod, proxy, config)
    assert all("ST_API_BASE" in {e["name"] for e in c.get("env", [])} for c in pod["containers"])
    [app_env] = [e for e in pod["containers"][0]["env"] if e["name"] == "ST_API_BASE"]
    assert app_env["value"] == "http://127.0.0.1:" + config["listen"].rsplit(":", 1)[1]


def test_the_gateway_exposes_only_its_data_port_through_the_service_and_guards_it_with_a_network_policy():
    docs = render(KUBE / "gateway")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    proxy = proxy_container(pod)
    config = embedded_config(docs)
    assert config["listen"].startswith("0.0.0.0:")
    _assert_proxy_container(pod, proxy, config)
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    data_port = int(config["listen"].rsplit(":", 1)[1])

    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    assert [ports[p["targetPort"]] for p in service["spec"]["ports"]] == [data_port]

    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert opened == {data_port, ports[ADMIN_PORT_NAME]}
    [data_rule] = [r for r in policy["ingress"] if any(p["port"] == data_port for p in r["ports"])]
    assert all("podSelector" in peer and "namespaceSelector" not in peer for peer in data_rule["from"])


def _assert_proxy_container(pod: dict, proxy: dict, config: dict) -> None:
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports[ADMIN_PORT_NAME] == int(config["admin_listen"].rsplit(":", 1)[1])
    assert config["admin_listen"].startswith("0.0.0.0:")  # the kubelet probes the pod IP
    paths = {kind: proxy[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["port"] for p in paths.values()} == {ADMIN_PORT_NAME}
    assert paths["livenessProbe"]["path"] == "/healthz" and paths["readinessProbe"]["path"] == "/readyz"
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]["memory"]

    context = proxy["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0

    shutdown = config.get("shutdown", {})
    assert pod["terminationGracePeriodSeconds"] > shutdown.get("drain_seconds", 5) + shutdown.get("timeout_seconds", 30)
    assert proxy["args"][proxy["args"].index("--config") + 1].startswith("/etc/st-proxy/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in proxy["volumeMounts"]:
        assert "subPath" not in mount  # a subPath mount never sees ConfigMap or Secret updates: no live reload
        assert mount["readOnly"] is True
        assert "configMap" in volumes[mount["name"]] or "secret" in volumes[mount["name"]]


def test_the_pod_monitor_scrapes_the_admin_port_of_both_patterns():
    monitor = one(render(KUBE / "monitoring"), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["port"] == ADMIN_PORT_NAME and endpoint["path"] == "/metrics"
    for overlay in ("sidecar", "gateway"):
        template = one(render(KUBE / overlay), "Deployment")["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert ADMIN_PORT_NAME in {p["name"] for p in proxy_container(template["spec"])["ports"]}


def test_the_gateway_redis_takes_only_its_password_key_and_only_st_proxy_pods_reach_it():
    docs = render(KUBE / "gateway")
    redis = [d for d in docs if d["metadata"]["name"] == "st-proxy-redis"]
    assert sorted(d["kind"] for d in redis) == ["Deployment", "NetworkPolicy", "Service"]
    deployment, policy, service = sorted(redis, key=lambda d: d["kind"])
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [env] = container["env"]
    secret = yaml.safe_load((KUBE / "secret.example.yaml").read_text())
    ref = env["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "redis_password")
    assert "$(REDIS_PASSWORD)" in container["args"] and not any(v.get("secret") for v in pod["volumes"])
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]

    config = embedded_config(docs)
    url = config["state"]["redis_url"]
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    assert config["state"]["password"] == {"file": "/run/secrets/st/redis_password"}
    replicas = one(docs, "Deployment")["spec"]["replicas"]
    assert config["state"]["fallback_rate_fraction"] <= 1 / replicas  # the replicas alone stay within the budget

    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    [rule] = policy["spec"]["ingress"]
    proxy_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert [peer["podSelector"]["matchLabels"].items() <= proxy_labels.items() for peer in rule["from"]] == [True]
    assert [p["port"] for p in rule["ports"]] == [6379]


# -- docker-compose ----------------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())


def host_path(container_path: str, volumes: list[str]) -> Path:
    """Where a file inside the st-proxy container comes from on the host, through its bind mounts."""
    for volume in volumes:
        host, inside, *_ = volume.split(":")
        if container_path.startswith(inside.rstrip("/") + "/"):
            return (COMPOSE / host / container_path[len(inside.rstrip("/")) + 1 :]).resolve()
    raise AssertionError(f"{container_path} is not mounted")


def test_the_compose_file_mounts_an_existing_config_whose_secrets_exist_and_which_validates():
    services = compose()["services"]
    proxy = services["st-proxy"]
    assert (COMPOSE / proxy["build"]["context"] / proxy["build"].get("dockerfile", "Dockerfile")).is_file()
    for volume in proxy["volumes"]:
        host, _, mode = volume.split(":")
        assert (COMPOSE / host).is_dir() and mode == "ro"  # directories: single-file mounts break live reload
    config_path = proxy["command"][proxy["command"].index("--config") + 1]
    host_config = host_path(config_path, proxy["volumes"])
    raw = yaml.safe_load(host_config.read_text())
    config = from_mapping(with_files_in(raw, lambda p: host_path(p, proxy["volumes"])), {})
    assert config.listen.host == "0.0.0.0"  # other containers must reach it
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
    assert proxy["user"].split(":")[0].isdigit()
    assert all(not str(port).endswith(f":{config.listen.port}") for port in proxy.get("ports", []))
    grace = int(proxy["stop_grace_period"].rstrip("s"))
    assert grace > config.shutdown.drain_seconds + config.shutdown.timeout_seconds


def test_the_compose_redis_is_the_proxys_state_with_the_same_password_file():
    services = compose()["services"]
    proxy = services["st-proxy"]
    config = yaml.safe_load(host_path("/etc/st-proxy/config.yaml", proxy["volumes"]).read_text())
    assert config["state"]["redis_url"] == "redis://redis:6379/0"
    password = host_path(config["state"]["password"]["file"], proxy["volumes"])
    [mount] = services["redis"]["volumes"]
    assert (COMPOSE / mount.split(":")[0]).resolve() == password and mount.endswith(":ro")
    assert "ports" not in services["redis"]  # never published on the host
    assert "redis" in proxy["depends_on"]


def test_the_legacy_app_and_the_proxy_point_at_each_other_by_service_name_and_port():
    services = compose()["services"]
    proxy = services["st-proxy"]
    config = yaml.safe_load(host_path("/etc/st-proxy/config.yaml", proxy["volumes"]).read_text())
    base = services["legacy-app"]["environment"]["ST_API_BASE"]
    assert base == f"http://st-proxy:{config['listen'].rsplit(':', 1)[1]}"
    assert services["legacy-app"]["depends_on"]["st-proxy"]["condition"] == "service_healthy"
    simulator_listen = services["simulator"]["command"][services["simulator"]["command"].index("--listen") + 1]
    for environment in config["environments"].values():
        assert environment["api_url"] == f"http://simulator:{simulator_listen.rsplit(':', 1)[1]}"
    admin_port = config["admin_listen"].rsplit(":", 1)[1]
    assert f"{admin_port}/readyz" in " ".join(proxy["healthcheck"]["test"])


async def test_the_compose_demo_credentials_work_against_the_bundled_simulator(simulator, start_proxy):
    proxy = compose()["services"]["st-proxy"]
    host_config = host_path("/etc/st-proxy/config.yaml", proxy["volumes"])
    raw = with_files_in(yaml.safe_load(host_config.read_text()), lambda p: host_path(p, proxy["volumes"]))
    raw["environments"] = {"simulator": {"auth_url": simulator.auth_url, "api_url": simulator.base_url}}
    running = await start_proxy(from_mapping(raw, {}))
    app = services_client(compose()["services"])
    for tenant in DEMO_TENANTS:
        async with running.session.get(
            f"{running.url}/crm/v2/tenant/{tenant.tenant_id}/customers", headers=app
        ) as resp:
            assert resp.status == 200
    assert simulator.token_requests_by_client[T1.client_id] == 1


def services_client(services: dict) -> dict[str, str]:
    """The client name and secret the legacy app sends, from its environment and its compose secret's file."""
    app = services["legacy-app"]
    [secret] = app["secrets"]
    secret_file = COMPOSE / compose()["secrets"][secret]["file"]
    assert f"/run/secrets/{secret}" in " ".join(app["command"])
    return basic_auth(app["environment"]["ST_PROXY_CLIENT"], secret_file.read_text().strip())


def test_the_compose_config_loads_from_disk_with_its_mounted_secret_files(tmp_path):
    """The strict file loader (not only the mapping validator) accepts it, secrets read through the host paths."""
    path = tmp_path / "config.yaml"
    proxy = compose()["services"]["st-proxy"]
    raw = yaml.safe_load(host_path("/etc/st-proxy/config.yaml", proxy["volumes"]).read_text())
    path.write_text(yaml.safe_dump(with_files_in(raw, lambda p: host_path(p, proxy["volumes"]))))
    assert len(load_file(path, {}).tenants) == len(DEMO_TENANTS)
