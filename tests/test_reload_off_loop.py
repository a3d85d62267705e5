"""A reload never blocks the event loop: the config file is parsed once per reload, in a worker thread, with PyYAML's
C loader where it is available, and the C loader finds exactly what the pure-Python one finds (duplicate keys
included)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from st_proxy.config import load_file, values
from st_proxy.ops.metrics import Metrics
from st_proxy.server.reload import ConfigHolder, Reloader

DEADLINE = 10.0  # seconds: a bound on waiting for an event, never a timing assertion
TENANTS = 5_000
ENV = {"ST_SECRET": "cs1.shared-secret", "ST_APP_KEY": "ak1.app-key"}


def big_config(path: Path, tenants: int = TENANTS) -> Path:
    lines = [
        "listen: 127.0.0.1:0",
        "admin_listen: 127.0.0.1:0",
        "app_key: {env: ST_APP_KEY}",
        "environments:",
        "  sim: {auth_url: 'http://127.0.0.1:9/connect/token', api_url: 'http://127.0.0.1:9'}",
        "tenants:",
    ]
    lines += [
        f"  {1_000_000 + i}: {{environment: sim, client_id: cid.{i}, client_secret: {{env: ST_SECRET}}}}"
        for i in range(tenants)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_c_loader_is_used_when_pyyaml_has_libyaml():
    assert yaml.__with_libyaml__, "PyYAML without libyaml: the C loader cannot be checked on this machine"
    assert issubclass(values.StrictLoader, yaml.CSafeLoader)
    assert not issubclass(values.PureStrictLoader, yaml.CSafeLoader)


DOCUMENTS = [
    "a: 1\nb: [1, 2, {c: d}]\n",
    "tenants:\n  '77': {x: 1}\n  77: {x: 2}\n",  # a string and a number: different keys in YAML
    "tenants:\n  77: {x: 1}\n  77: {x: 2}\n",  # a duplicate key
    "a: 1\nb:\n  c: 2\n  c: 3\n",  # a nested duplicate
    "base: &b {x: 1, y: 2}\nmerged:\n  <<: *b\n  y: 3\n",  # merge keys are not duplicates
    "- a\n- b\n",
    "",
    "x: !!python/object:os.system ls\n",  # safe loading refuses arbitrary tags
    "a: 1\n---\nb: 2\n",
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_the_c_and_pure_loaders_give_the_same_document_or_the_same_problem(text):
    def outcome(loader):
        try:
            return ("ok", values.parse_yaml(text, loader=loader))
        except ValueError as exc:
            return ("problem", str(exc))

    assert outcome(values.StrictLoader) == outcome(values.PureStrictLoader)


@pytest.mark.parametrize("text", ["a: [unclosed\n", "a: b: c\n", "a: 1\n b: 2\n\tc: 3\n"])
def test_a_syntax_error_is_placed_at_the_same_line_and_column_by_both_loaders(text):
    # libyaml words its syntax errors differently ("did not find expected ','" for "expected ',' or ']'"): the place,
    # which is what a user fixes the file by, is the same.
    def place(loader) -> str:
        with pytest.raises(ValueError) as caught:
            values.parse_yaml(text, loader=loader)
        return str(caught.value).split(": ", 1)[0]

    assert place(values.StrictLoader) == place(values.PureStrictLoader)
    assert place(values.StrictLoader).startswith("invalid YAML at line ")


def test_the_c_loader_refuses_a_duplicate_key_with_its_line():
    with pytest.raises(ValueError, match=r"duplicate key 77 \(first at line 2\)"):
        values.parse_yaml("tenants:\n  77: {x: 1}\n  77: {x: 2}\n")


async def test_a_reload_parses_the_file_once(tmp_path, monkeypatch):
    path = big_config(tmp_path / "config.yaml", tenants=3)
    holder = ConfigHolder(load_file(path, ENV))
    reloader = Reloader(holder, Metrics(CollectorRegistry()), tokens=lambda: None, load=lambda: load_file(path, ENV))
    parses = []
    real_load = yaml.load
    monkeypatch.setattr(yaml, "load", lambda *a, **k: parses.append(1) or real_load(*a, **k))
    assert await reloader.reload_now("test") is True
    assert len(parses) == 1
    path.write_text("tenants: [unclosed\n")  # a failed reload too
    assert await reloader.reload_now("test") is False
    assert len(parses) == 2


async def test_the_loop_keeps_answering_while_a_5000_tenant_config_is_loaded(tmp_path, aiohttp_server):
    """The load is held (on a threading.Event) until the loop has answered an HTTP request: if the load ran on the
    loop, the loop could answer nothing until it returned, and the order below would be different."""
    path = big_config(tmp_path / "config.yaml")
    holder = ConfigHolder(load_file(path, ENV))
    loop = asyncio.get_running_loop()
    order: list[str] = []
    entered = asyncio.Event()
    proceed = threading.Event()

    def load():
        loop.call_soon_threadsafe(order.append, "load started")
        loop.call_soon_threadsafe(entered.set)
        proceed.wait(DEADLINE)  # on the loop this would hold every other task up to the deadline
        config = load_file(path, ENV)
        loop.call_soon_threadsafe(order.append, "load finished")
        return config

    async def ping(request: web.Request) -> web.Response:
        order.append("request answered")
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/ping", ping)
    server = await aiohttp_server(app)
    reloader = Reloader(holder, Metrics(CollectorRegistry()), tokens=lambda: None, load=load)
    reload = asyncio.create_task(reloader.reload_now("test"))
    await asyncio.wait_for(entered.wait(), DEADLINE)
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/ping")) as resp:
        assert await resp.text() == "pong"
    proceed.set()
    assert await asyncio.wait_for(reload, DEADLINE) is True
    await asyncio.sleep(0)  # the "load finished" callback is queued before the reload task resumes
    assert order == ["load started", "request answered", "load finished"]
    assert len(holder.current.tenants) == TENANTS
