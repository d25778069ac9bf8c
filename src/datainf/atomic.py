"""Atomic writes: a file or folder appears whole or not at all.

Everything is written under a temporary sibling name (``.NAME.tmp-PID``) and renamed into place once
complete, so an interrupted run never leaves a half-written output that a later run would trust, and a
failed write leaves whatever was at the path before untouched. ``fsync=True`` also flushes the data and the
rename to disk (the gradient store uses it: a power cut must not leave a chunk that looks whole).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """``.NAME.tmp-PID[suffix]`` next to ``path`` (a suffix keeps tools that look at the extension happy)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file mode creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain ``open()`` / ``mkdir()`` would:
    0o666 or 0o777 less the umask (writers that go through temporary files, such as safetensors, leave 0o600)."""
    mask = umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write a file to; on success it replaces ``path`` in one rename, on any
    error it is removed and ``path`` is left as it was. Parent folders are created. The file gets the mode a
    plain ``open()`` gives a new file (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, suffix)
    try:
        yield tmp
        plain_modes(tmp)
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_directory(path: str | os.PathLike, *, fsync: bool = False, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it is renamed to ``path``.

    ``path`` must not exist, unless ``replace=True``: then the old folder is moved aside, the new one
    renamed in, and the old one deleted (a crash in between leaves the old folder under a ``.old`` name,
    never a mix). On any error the temporary folder is removed and ``path`` is untouched. The folder and its
    files get the modes a plain ``mkdir()`` and ``open()`` give (0o777 and 0o666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        plain_modes(tmp)
        if fsync:
            for file in tmp.rglob("*"):
                if file.is_file():
                    _fsync_file(file)
            fsync_dir(tmp)
        if path.exists() and replace:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)  # fails if a non-empty folder is in the way: never merged into
        if fsync:
            fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (parent folders are created)."""
    with replacing(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any, *, fsync: bool = False) -> None:
    """JSON (indented; objects it cannot encode are written with str) to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n", fsync=fsync)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    with replacing(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def savefig(figure: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG to ``path`` atomically, then close it."""
    import matplotlib.pyplot as plt

    try:
        with replacing(path, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=dpi)
    finally:
        plt.close(figure)


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, waiting: str) -> Iterator[None]:
    """Hold an OS lock on ``lock_path`` (fcntl/msvcrt through ``filelock``; released if the process dies) for
    the ``with`` body, so one process at a time builds what it guards; logs ``waiting`` once if another
    process holds it, then waits. Callers check again, inside, whether the thing is already built."""
    import logging

    import filelock

    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logging.getLogger("datainf").warning(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


__all__ = ["exclusive", "fsync_dir", "new_directory", "plain_modes", "replacing", "save_safetensors", "savefig", "temporary_sibling",
           "umask", "write_json", "write_text"]
