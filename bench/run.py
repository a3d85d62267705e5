"""The one entry point for the benchmarks: `.venv/bin/python bench/run.py SCENARIO [options]`, `bench/run.py --list`.

A scenario is any module in bench/ that defines::

    SCENARIO = "name"                                   # the command-line name
    HELP = "one line"                                   # shown by --list and --help
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...      # the exit code

Modules are imported by file path (bench/ is not an installed package) with bench/ on sys.path, so a scenario can
`import common` for the shared helpers. A module without SCENARIO (common.py, this file) is not a scenario.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REQUIRED = {"SCENARIO": str, "HELP": str, "add_arguments": callable, "run": callable}


def _interface_problems(module: ModuleType) -> list[str]:
    problems = []
    for name, kind in REQUIRED.items():
        value = getattr(module, name, None)
        ok = callable(value) if kind is callable else isinstance(value, kind)  # type: ignore[arg-type]
        if not ok:
            problems.append(f"{name} is missing or not a {'function' if kind is callable else 'string'}")
    return problems


def discover(directory: Path = HERE) -> tuple[dict[str, ModuleType], list[str]]:
    """Every scenario module in ``directory`` by name, and the problems found (modules that failed to import...)."""
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    scenarios: dict[str, ModuleType] = {}
    problems: list[str] = []
    for path in sorted(directory.glob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        source = path.read_text(encoding="utf-8")
        if "SCENARIO" not in source:
            # Helpers such as common.py are not imported here: scenarios import them as `common`, and a second copy
            # under another name would be a second set of module globals.
            continue
        name = f"bench_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            problems.append(f"{path.name}: cannot import: {type(exc).__name__}: {exc}")
            continue
        if not hasattr(module, "SCENARIO"):
            continue
        if broken := _interface_problems(module):
            problems.append(f"{path.name}: not a scenario: {'; '.join(broken)}")
            continue
        if module.SCENARIO in scenarios:
            problems.append(f"{path.name}: scenario {module.SCENARIO!r} is already defined by another module")
            continue
        scenarios[module.SCENARIO] = module
    return scenarios, problems


def main(argv: list[str] | None = None) -> int:
    scenarios, problems = discover()
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Run one benchmark scenario against real processes on loopback.",
        epilog="`bench/run.py SCENARIO --help` shows a scenario's options.",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO")
    for name, module in sorted(scenarios.items()):
        scenario_parser = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(scenario_parser)
    args = parser.parse_args(argv)
    for problem in problems:
        print(f"bench: {problem}", file=sys.stderr)
    if args.list:
        width = max((len(name) for name in scenarios), default=0)
        for name, module in sorted(scenarios.items()):
            print(f"{name:<{width}}  {module.HELP}")
        return 1 if problems else 0
    if args.scenario is None:
        parser.print_usage(sys.stderr)
        print("bench/run.py: name a scenario (see --list)", file=sys.stderr)
        return 2
    return int(scenarios[args.scenario].run(args))


if __name__ == "__main__":
    raise SystemExit(main())
