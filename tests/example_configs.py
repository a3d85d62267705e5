"""The example configs in config/, made loadable in a test: every secret they reference is provided (env vars with
distinctive values, files under a temporary directory), so a test can prove the examples still validate."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from st_proxy.config.values import parse_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLES = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
FILE_REF = re.compile(r"\{file: ([^}\s]+)\}")


@dataclass
class Example:
    path: Path  # a copy whose file references point into the temporary directory
    environ: dict[str, str]
    secrets: list[str]  # every value provided: none may ever be printed


def _references(node: object) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        if len(node) == 1 and next(iter(node)) in ("env", "file", "value"):
            kind = next(iter(node))
            yield kind, node[kind]
            return
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def materialize(name: str, tmp_path: Path) -> Example:
    text = (CONFIG_DIR / name).read_text()
    refs = list(_references(parse_yaml(text)))
    environ: dict[str, str] = {}
    secrets: list[str] = []
    for kind, where in refs:
        if kind == "env":
            environ[where] = f"secret-value-{len(secrets)}-from-env-{where}"
            secrets.append(environ[where])
    secrets_dir = tmp_path / "secrets"

    def to_temp_file(match: re.Match[str]) -> str:
        target = secrets_dir / match.group(1).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        value = f"secret-value-{len(secrets)}-from-file"
        target.write_text(value + "\n")
        secrets.append(value)
        return f"{{file: {target}}}"

    lines, replaced = [], 0
    for line in text.splitlines(keepends=True):
        if not line.lstrip().startswith("#"):  # the comments show the syntax too; leave them alone
            line, count = FILE_REF.subn(to_temp_file, line)
            replaced += count
        lines.append(line)
    text = "".join(lines)
    # Every file reference must be in the {file: PATH} form this rewrites, or the test would read the real path.
    assert replaced == sum(1 for kind, _ in refs if kind == "file"), f"{name}: write file references as {{file: PATH}}"
    path = tmp_path / name
    path.write_text(text)
    return Example(path, environ, secrets)
