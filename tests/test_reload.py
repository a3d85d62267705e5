"""Live reload (docs/operations.md): file changes by atomic rename and by Kubernetes' `..data` symlink swap, SIGHUP to a
real `st-proxy serve` process, and invalid configs that must leave the running one in force.

In-process tests drive ``Reloader.check_now()`` / ``reload_now()`` directly, so nothing waits for a poll.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import T1, T2
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServeProcess, no_file_environment, poll_until

from st_proxy.config import ConfigError, load_file
from st_proxy.devtools.simulator import DEMO_APP_KEY, SimTenant
from st_proxy.server.reload import Reloader

T3 = SimTenant("1000003", "cid.demo3", "cs1.demo-secret-3")
SECRETS = (DEMO_APP_KEY, T1.client_secret, T2.client_secret, T3.client_secret)


def write_atomic(path: Path, text: str) -> None:
    """How careful tools replace a file: write a temporary one beside it, then rename(2) it over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class KubeVolume:
    """A directory laid out and updated exactly like kubelet's atomic writer (pkg/volume/util/atomic_writer.go).

    ``..<timestamp>/`` holds the files, ``..data`` points at it, each visible name is ``name -> ..data/name``. An update
    writes a new timestamped directory, points ``..data_tmp`` at it, renames that over ``..data``, then removes the old
    directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self._generation = 0

    def path(self, name: str) -> Path:
        return self.root / name

    def update(self, files: dict[str, str]) -> None:
        self._generation += 1
        stamp = datetime(2026, 1, 31, 10, 0, self._generation).strftime("..%Y_%m_%d_%H_%M_%S.000000001")
        new_dir = self.root / stamp
        new_dir.mkdir()
        for name, text in files.items():
            (new_dir / name).write_text(text)
        data = self.root / "..data"
        old_dir = os.readlink(data) if data.is_symlink() else None
        os.symlink(stamp, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", data)
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        for link in self.root.iterdir():
            if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
                link.unlink()
        if old_dir is not None:
            for f in (self.root / old_dir).iterdir():
                f.unlink()
            (self.root / old_dir).rmdir()


def config_doc(sim, tenants, secret_dir: Path, **extra) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "app_key": {"file": str(secret_dir / "app_key")},
        "environments": {"sim": {"auth_url": sim.auth_url, "api_url": sim.base_url}},
        "tenants": {
            t.tenant_id: {
                "environment": "sim",
                "client_id": t.client_id,
                "client_secret": {"file": str(secret_dir / f"{t.tenant_id}.client_secret")},
            }
            for t in tenants
        },
        **extra,
    }


def secret_files(*tenants: SimTenant, app_key: str = DEMO_APP_KEY) -> dict[str, str]:
    return {"app_key": app_key + "\n", **{f"{t.tenant_id}.client_secret": t.client_secret + "\n" for t in tenants}}


def reloads(metrics_text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "st_proxy_config_reloads":
            return {s.labels["result"]: s.value for s in family.samples if s.name.endswith("_total")}
    raise AssertionError("st_proxy_config_reloads_total is missing")


def log_records(text: str, event: str) -> list[dict]:
    return [r for r in map(json.loads, text.splitlines()) if r.get("event") == event]


def write_plain_files(tmp_path: Path, simulator) -> tuple[Path, Path]:
    """config.yaml serving T1 and T2, and a secrets directory holding T1's, T2's and T3's secret files."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, text in secret_files(T1, T2, T3).items():
        (secrets / name).write_text(text)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_doc(simulator, [T1, T2], secrets)))
    return path, secrets


def reloader_for(proxy, path) -> Reloader:
    """A Reloader on a started proxy that re-reads ``path``; poll_seconds=0: no polling loop, each test triggers its reloads."""
    return Reloader(
        proxy.runtime.holder,
        proxy.runtime.metrics,
        tokens=lambda: proxy.runtime.tokens,
        load=lambda: load_file(path, {}),
        poll_seconds=0,
    )


@pytest.fixture
async def plain(tmp_path, simulator, start_proxy):
    """A proxy whose config and secrets are plain files in tmp_path, with a Reloader on it."""
    path, secrets = write_plain_files(tmp_path, simulator)
    proxy = await start_proxy(load_file(path, {}))
    reloader = reloader_for(proxy, path)
    yield proxy, reloader, path, secrets
    await reloader.close()


@pytest.fixture
async def kube(tmp_path, simulator, start_proxy):
    """The same, with the config in a ConfigMap-like volume and the secrets in a Secret-like volume."""
    config_volume, secret_volume = KubeVolume(tmp_path / "config"), KubeVolume(tmp_path / "secrets")
    secret_volume.update(secret_files(T1, T2))
    config_volume.update({"config.yaml": yaml.safe_dump(config_doc(simulator, [T1, T2], secret_volume.root))})
    path = config_volume.path("config.yaml")
    proxy = await start_proxy(load_file(path, {}))
    reloader = reloader_for(proxy, path)
    yield proxy, reloader, config_volume, secret_volume
    await reloader.close()


async def _status(proxy, tenant_id: str, resource: str = "customers") -> int:
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{tenant_id}/{resource}") as resp:
        await resp.read()
        return resp.status


async def _sent_token(proxy, tenant_id: str) -> str:
    """The Authorization header the simulator's echo resource received through the proxy."""
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{tenant_id}/echo") as resp:
        assert resp.status == 200
        headers = (await resp.json())["headers"]
    return next(v for k, v in headers if k.lower() == "authorization")


# -- file changes ------------------------------------------------------------------------------------------------
async def test_a_tenant_added_by_an_atomic_rename_is_served_at_once(plain, simulator):
    proxy, reloader, path, secrets = plain
    simulator.add_tenant(T3)
    assert await _status(proxy, T3.tenant_id) == 403

    write_atomic(path, yaml.safe_dump(config_doc(simulator, [T1, T2, T3], secrets)))
    assert await reloader.check_now() is True

    assert await _status(proxy, T3.tenant_id) == 200
    assert await _status(proxy, T1.tenant_id) == 200
    assert reloads(await proxy.metrics_text()) == {"success": 1.0, "failure": 0.0}
    async with proxy.session.get(proxy.admin_url + "/tenants") as resp:
        assert [t["id"] for t in (await resp.json())["tenants"]] == [T1.tenant_id, T2.tenant_id, T3.tenant_id]


async def test_unchanged_files_cause_no_reload(plain):
    proxy, reloader, path, _ = plain
    assert await reloader.check_now() is None
    os.utime(path)  # touched, same content: a reload is harmless, but here the stat did change
    assert await reloader.check_now() is True
    assert await reloader.check_now() is None
    assert reloads(await proxy.metrics_text()) == {"success": 1.0, "failure": 0.0}


async def test_a_secret_rotated_through_a_kubernetes_data_symlink_swap_is_used_for_the_next_request(kube, simulator):
    proxy, reloader, _, secret_volume = kube
    old_token = await _sent_token(proxy, T1.tenant_id)
    fetches_before = simulator.token_requests_by_client[T1.client_id]

    rotated = SimTenant(T1.tenant_id, T1.client_id, "cs1.rotated-by-the-tenant-admin")
    simulator.set_secret(T1.tenant_id, rotated.client_secret)  # the old secret no longer gets a token
    secret_volume.update(secret_files(rotated, T2))
    assert await reloader.check_now() is True

    new_token = await _sent_token(proxy, T1.tenant_id)
    assert new_token != old_token  # the token minted from the old secret was dropped, not sent again
    assert simulator.token_requests_by_client[T1.client_id] == fetches_before + 1
    assert await _sent_token(proxy, T2.tenant_id)  # the other tenant is untouched


async def test_a_tenant_removed_through_a_kubernetes_configmap_update_gets_403(kube, simulator, captured_logs):
    proxy, reloader, config_volume, secret_volume = kube
    assert await _status(proxy, T2.tenant_id) == 200

    config_volume.update({"config.yaml": yaml.safe_dump(config_doc(simulator, [T1], secret_volume.root))})
    assert await reloader.check_now() is True

    assert await _status(proxy, T2.tenant_id) == 403
    assert await _status(proxy, T1.tenant_id) == 200
    text = await proxy.metrics_text()  # the removed tenant's series do not break a scrape
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert {"tenant": "none", "method": "GET", "code": "403"} in [s.labels for s in samples if s.value == 1.0]
    assert not [s for s in samples if s.labels.get("tenant") == T2.tenant_id]  # a removed id is no label value
    [line] = log_records(captured_logs(), "config_reloaded")
    assert line["tenants_removed"] == [T2.tenant_id] and line["tenants_added"] == []


async def test_a_secret_file_that_appears_after_its_config_is_picked_up_without_a_signal(plain, simulator):
    proxy, reloader, path, secrets = plain
    simulator.add_tenant(T3)
    (secrets / f"{T3.tenant_id}.client_secret").unlink()
    # In Kubernetes the ConfigMap naming a new tenant often lands before the Secret holding its credentials.
    write_atomic(path, yaml.safe_dump(config_doc(simulator, [T1, T2, T3], secrets)))
    assert await reloader.check_now() is False
    assert await reloader.check_now() is None  # no retry storm while nothing changes

    (secrets / f"{T3.tenant_id}.client_secret").write_text(T3.client_secret)
    assert await reloader.check_now() is True
    assert await _status(proxy, T3.tenant_id) == 200
    assert reloads(await proxy.metrics_text()) == {"success": 1.0, "failure": 1.0}


def test_the_watcher_finds_every_secret_file_an_unvalidated_config_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("app_key: {file: /run/a}\ntenants:\n  '1': {client_secret: {file: s/b}, typo: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path, {})
    assert caught.value.files == (Path("/run/a"), tmp_path / "s" / "b")
    path.write_text("tenants: [unclosed")
    with pytest.raises(ConfigError) as caught:
        load_file(path, {})
    assert caught.value.files == ()


# -- invalid configs ---------------------------------------------------------------------------------------------
BROKEN = {
    "bad YAML": lambda doc: "tenants: {unclosed\n  - " + DEMO_APP_KEY,
    "failed validation": lambda doc: yaml.safe_dump({**doc, "tenants": {"12ab": {}}, "tokenz": {}}),
    "missing secret file": lambda doc: yaml.safe_dump(
        {**doc, "app_key": {"file": doc["app_key"]["file"] + ".missing"}}
    ),
}


@pytest.mark.parametrize("breakage", list(BROKEN), ids=list(BROKEN))
async def test_an_invalid_config_is_logged_counted_and_the_old_one_keeps_serving(
    plain, simulator, breakage, captured_logs
):
    proxy, reloader, path, secrets = plain
    old = proxy.runtime.holder.current
    write_atomic(path, BROKEN[breakage](config_doc(simulator, [T1], secrets)))

    assert await reloader.check_now() is False
    assert proxy.runtime.holder.current is old
    assert await _status(proxy, T2.tenant_id) == 200  # still configured: the old config is in force
    assert reloads(await proxy.metrics_text()) == {"success": 0.0, "failure": 1.0}
    logs = captured_logs()
    [line] = log_records(logs, "config_reload_failed")
    assert line["level"] == "error" and line["problems"]
    assert all(problem in line["message"] for problem in line["problems"])  # every problem on the one line
    assert not any(secret in logs for secret in SECRETS)


async def test_every_validation_problem_is_named_on_the_failure_line(plain, simulator, captured_logs):
    _, reloader, path, secrets = plain
    doc = config_doc(simulator, [T1], secrets)
    doc["tenants"]["12ab"] = {}
    doc["tokenz"] = {}
    write_atomic(path, yaml.safe_dump(doc))
    assert await reloader.reload_now() is False
    [line] = log_records(captured_logs(), "config_reload_failed")
    assert any(p.startswith("tenants.12ab") for p in line["problems"])
    assert any(p.startswith("tokenz") for p in line["problems"])


async def test_listen_addresses_and_other_start_up_settings_cannot_change_at_reload_and_the_log_says_so(
    plain, simulator, captured_logs
):
    proxy, reloader, path, secrets = plain
    before = proxy.runtime.holder.current
    doc = config_doc(
        simulator,
        [T1],
        secrets,
        listen="127.0.0.1:18080",
        admin_listen="127.0.0.1:19090",
        upstream={"max_connections": 7},
        routing={"tenant_header": "X-Customer"},
    )
    write_atomic(path, yaml.safe_dump(doc))
    assert await reloader.check_now() is True

    after = proxy.runtime.holder.current
    assert (after.listen, after.admin_listen, after.upstream) == (before.listen, before.admin_listen, before.upstream)
    assert after.routing.tenant_header == "X-Customer"  # everything else did apply
    [line] = log_records(captured_logs(), "config_reload_restart_needed")
    assert line["level"] == "warning" and line["keys"] == ["listen", "admin_listen", "upstream"]


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(plain, simulator):
    proxy, reloader, path, secrets = plain
    url = f"{proxy.url}/crm/v2/tenant/{T2.tenant_id}/download?bytes=400000&chunk=65536&delay=0.01"
    async with proxy.session.get(url) as resp:
        assert resp.status == 200
        first = await resp.content.readexactly(65536)  # the stream is under way

        write_atomic(path, yaml.safe_dump(config_doc(simulator, [T1], secrets)))  # T2 removed meanwhile
        assert await reloader.check_now() is True
        assert await _status(proxy, T2.tenant_id) == 403  # new requests see the new config at once

        rest = await resp.read()
    assert len(first) + len(rest) == 400000


async def test_no_file_mode_has_nothing_to_re_read_and_says_so(simulator, start_proxy, captured_logs):
    from conftest import sim_config

    proxy = await start_proxy(sim_config(simulator))
    reloader = Reloader(proxy.runtime.holder, proxy.runtime.metrics, tokens=lambda: proxy.runtime.tokens, load=None)
    assert await reloader.reload_now("SIGHUP") is False
    assert await reloader.check_now() is None
    [line] = log_records(captured_logs(), "config_reload_skipped")
    assert "nothing to re-read" in line["message"]
    assert reloads(await proxy.metrics_text()) == {"success": 0.0, "failure": 0.0}


# -- a real `st-proxy serve` process -----------------------------------------------------------------------------
@pytest.fixture
async def child(tmp_path, simulator) -> AsyncIterator:
    path, secrets = write_plain_files(tmp_path, simulator)
    proc = await ServeProcess.start(path)
    yield proc, path, secrets
    await proc.close()
    assert not any(secret in proc.output() for secret in (*SECRETS, "cs1.demo-secret-X"))


async def _get(url: str, **kwargs) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as resp:
        return resp.status, await resp.text()


async def test_sighup_makes_a_running_proxy_serve_an_added_tenant_and_refuse_a_removed_one(child, simulator):
    proc, path, secrets = child
    simulator.add_tenant(T3)
    assert (await _get(f"{proc.url}/crm/v2/tenant/{T3.tenant_id}/customers"))[0] == 403

    path.write_text(yaml.safe_dump(config_doc(simulator, [T1, T3], secrets)))
    proc.send(signal.SIGHUP)
    line = await proc.wait_event("config_reloaded")
    assert line["tenants_added"] == [T3.tenant_id] and line["tenants_removed"] == [T2.tenant_id]

    assert (await _get(f"{proc.url}/crm/v2/tenant/{T3.tenant_id}/customers"))[0] == 200
    assert (await _get(f"{proc.url}/crm/v2/tenant/{T2.tenant_id}/customers"))[0] == 403


async def test_sighup_re_reads_a_rotated_secret_even_when_its_file_looks_unchanged(child, simulator):
    proc, path, secrets = child
    status, body = await _get(f"{proc.url}/crm/v2/tenant/{T1.tenant_id}/echo")
    assert status == 200
    before = simulator.token_requests_by_client[T1.client_id]

    # Same length, same inode, the old mtime put back: no stat-based watcher can see this write; SIGHUP must.
    secret_file = secrets / f"{T1.tenant_id}.client_secret"
    stat = secret_file.stat()
    rotated = "cs1.demo-secret-X"
    assert len(rotated) == len(T1.client_secret)
    with open(secret_file, "r+") as f:
        f.write(rotated + "\n")
    os.utime(secret_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    simulator.set_secret(T1.tenant_id, rotated)

    proc.send(signal.SIGHUP)
    line = await proc.wait_event("config_reloaded")
    assert line["trigger"] == "SIGHUP" and line["credentials_changed"] == [T1.tenant_id]
    status, after = await _get(f"{proc.url}/crm/v2/tenant/{T1.tenant_id}/echo")
    assert status == 200
    assert simulator.token_requests_by_client[T1.client_id] > before
    old_auth = next(v for k, v in json.loads(body)["headers"] if k.lower() == "authorization")
    new_auth = next(v for k, v in json.loads(after)["headers"] if k.lower() == "authorization")
    assert new_auth != old_auth


async def test_a_broken_file_leaves_a_running_proxy_serving_and_the_failure_shows_in_metrics(child):
    proc, path, _ = child
    path.write_text("tenants: [this is not\n")
    proc.send(signal.SIGHUP)
    await proc.wait_event("config_reload_failed")

    assert (await _get(f"{proc.url}/crm/v2/tenant/{T2.tenant_id}/customers"))[0] == 200
    counts = reloads((await _get(proc.admin_url + "/metrics"))[1])
    assert counts["failure"] >= 1 and counts["success"] == 0  # the watcher may have seen the write first


async def test_a_running_proxy_notices_a_changed_file_without_a_signal(child, simulator):
    proc, path, secrets = child
    simulator.add_tenant(T3)
    write_atomic(path, yaml.safe_dump(config_doc(simulator, [T1, T2, T3], secrets)))

    async def served() -> bool:
        return (await _get(f"{proc.url}/crm/v2/tenant/{T3.tenant_id}/customers"))[0] == 200

    await poll_until(served, what="the new tenant being served")
    assert (await proc.wait_event("config_reloaded"))["trigger"].startswith("changed: ")


async def test_sighup_to_a_proxy_in_no_file_mode_logs_that_there_is_nothing_to_re_read(simulator, tmp_path):
    env = no_file_environment(simulator, T1)
    proc = await ServeProcess.start(tmp_path, command=[sys.executable, "-m", "st_proxy", "serve"], env=env)
    try:
        assert proc.with_event("start")[0]["watching"] == []
        proc.send(signal.SIGHUP)
        line = await proc.wait_event("config_reload_skipped")
        assert "environment is read once at start" in line["message"]
        assert (await _get(f"{proc.url}/crm/v2/tenant/{T1.tenant_id}/customers"))[0] == 200
    finally:
        await proc.close()
    assert T1.client_secret not in proc.output() and DEMO_APP_KEY not in proc.output()
