"""Has any of these files changed? Answered by comparing ``os.stat`` snapshots, polled by ``reload.Reloader``.

Polling rather than inotify: no new dependency, and it sees every way a file can change, on every filesystem (overlay,
NFS, the tmpfs of a Kubernetes volume), including a changed symlink target.

Kubernetes mounts a ConfigMap or Secret volume through its "atomic writer" (kubelet ``pkg/volume/util/atomic_writer.go``):
the files live in a timestamped directory ``..2026_01_31_10_00_00.123456789/``, a symlink ``..data`` points at it, and
each visible name is a symlink ``config.yaml -> ..data/config.yaml``. An update writes a new timestamped directory,
points a temporary symlink ``..data_tmp`` at it and renames that over ``..data`` (one atomic ``rename(2)``), then
deletes the old directory. The visible name itself never changes, so watching its own inode would miss the update;
``os.stat`` follows the symlinks to the file the name means *now*, and ``os.path.realpath`` names that file, so the
swap shows up as a new real path and inode. The same snapshot catches an editor's write-then-rename (new inode), an
in-place write (new size or mtime), and a file that appears or disappears. A ``subPath`` mount is a bind mount of one
file at start and never sees updates: mount the whole volume (docs/operations.md says so).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

Snapshot = tuple[str, int, int, int, int] | None  # (real path, device, inode, size, mtime in ns), None if missing


def snapshot(path: Path) -> Snapshot:
    try:
        st = os.stat(path)  # follows symlinks: the file this name points at now
        real = os.path.realpath(path)
    except OSError:  # missing, a dangling symlink mid-swap, or unreadable: all "not there now"
        return None
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatch:
    """The last seen snapshot of each watched path; ``changed()`` compares and remembers the new one."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self._seen: dict[Path, Snapshot] = {}
        self.watch(paths)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(self._seen)

    def watch(self, paths: Iterable[Path]) -> None:
        """Watch exactly ``paths`` from now on; their current state is the baseline."""
        self._seen = {Path(p): snapshot(Path(p)) for p in dict.fromkeys(paths)}

    def changed(self) -> list[Path]:
        """The paths whose state differs from the last look (and remember the new states)."""
        changed = []
        for path, before in self._seen.items():
            now = snapshot(path)
            if now != before:
                self._seen[path] = now
                changed.append(path)
        return changed
