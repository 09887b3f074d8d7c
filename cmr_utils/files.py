"""Writing files so that a reader never sees half of one: temp file in the same folder, then rename."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)``, then rename the temp file to ``path``; on failure remove it."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_name, 0o666 & ~umask)  # the permissions of a file written plainly, not mkstemp's owner-only 0600
    try:
        write(Path(temp_name))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


class AtomicDir:
    """A temporary sibling folder to fill; ``commit()`` swaps it in for ``target``, ``abort()`` removes it and
    every parent folder of ``target`` that it created (when empty), so that a failed run leaves no folder."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        missing = [p for p in [self.target.parent, *self.target.parent.parents] if not p.exists()]
        self.created = missing  # deepest first: the order abort removes them in
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()

    def commit(self) -> None:
        old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
        moved = False
        try:
            if self.target.exists():
                os.replace(self.target, old)
                moved = True
            os.replace(self.path, self.target)
        except BaseException:  # an interrupt between the two renames: the earlier output goes back in place
            if moved and not self.target.exists():
                os.replace(old, self.target)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for folder in self.created:
            try:
                folder.rmdir()  # only if empty: another process may have put something there since
            except OSError:
                break
