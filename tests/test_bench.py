"""bench/run.py: the scenarios are discovered, and a tiny bounded run of one works end to end (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"
FOLDED_IN = ("throughput", "stream_memory", "soak_short_tokens")


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=120)


def test_list_names_every_scenario_with_its_help_line():
    result = bench("--list")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert set(FOLDED_IN) <= set(listed)
    assert all(len(line.split(None, 1)) == 2 for line in listed.values())  # a name and its one-line help


def test_an_unknown_scenario_is_refused_with_a_usage_error():
    result = bench("no-such-scenario")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_a_tiny_throughput_run_with_the_bundled_load_generator_prints_a_result_table():
    result = bench(
        "throughput", "--load-generator", "python", "--seconds", "1", "--max-requests", "200", "--connections", "4"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "req/s" in line)
    assert header.split() == ["req/s", "p50", "ms", "p90", "ms", "p99", "ms", "requests", "failed"]
    proxied = next(line for line in lines if line.startswith("proxied")).split()
    requests, failed = int(proxied[5]), int(proxied[6])
    assert 0 < requests <= 200 and failed == 0


def test_discovery_reports_modules_that_break_the_scenario_interface(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run_under_test", RUN)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    good = 'SCENARIO = "{}"\nHELP = "h"\ndef add_arguments(parser):\n    pass\ndef run(args):\n    return 0\n'
    (tmp_path / "one.py").write_text(good.format("one"))
    (tmp_path / "again.py").write_text(good.format("one"))  # the same name twice
    (tmp_path / "norun.py").write_text('SCENARIO = "norun"\nHELP = "h"\ndef add_arguments(parser):\n    pass\n')
    (tmp_path / "crash.py").write_text('SCENARIO = "crash"\nraise RuntimeError("boom")\n')
    (tmp_path / "helper.py").write_text("raise RuntimeError('a helper is never imported by discovery')\n")
    scenarios, problems = run.discover(tmp_path)
    assert list(scenarios) == ["one"]
    assert scenarios["one"].__file__ == str(tmp_path / "again.py")  # sorted by file name: again.py comes first
    assert sorted(problems) == [
        "crash.py: cannot import: RuntimeError: boom",
        "norun.py: not a scenario: run is missing or not a function",
        "one.py: scenario 'one' is already defined by another module",
    ]
