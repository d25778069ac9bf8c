"""The writer's lock on a store: STORE/lock (pid, host, token), read and replaced under an OS lock (``filelock``)."""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from datainf import atomic
from datainf.errors import DataInfError, parse_json
from datainf.store.files import LOCK_TIMEOUT_S, WRITER_LOCK

logger = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    return _pid_alive(pid)


def _writer_lock(store: Path, timeout: float = LOCK_TIMEOUT_S) -> Any:
    """The OS lock (fcntl/msvcrt through ``filelock``) held while the JSON lock is read and replaced."""
    import filelock

    return filelock.FileLock(str(store / WRITER_LOCK), timeout=timeout)


def acquire_lock(store: Path) -> dict[str, Any]:
    """Take STORE/lock, or take over a stale one (dead pid on this host). Returns its content.

    The check and the (over)write happen under the OS lock STORE/.writer.lock, so two writers can never both
    see a stale lock and both take it; the JSON file keeps who holds the store (for messages, and for the
    ranks of a distributed job, which join with its token)."""
    import filelock

    lock = store / "lock"
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    try:
        with _writer_lock(store):
            held = None
            if lock.exists():
                try:
                    held = parse_json(lock.read_bytes(), str(lock))
                    pid, host = int(held["pid"]), str(held["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise DataInfError(
                        f"store {store} is locked by an unknown writer (unreadable {lock}); "
                        f"remove {lock} if no process is writing this store"
                    ) from None
                if host == mine["host"] and not _pid_alive(pid):
                    logger.warning("store %s: taking over a stale lock of process %d (no longer running)",
                                   store, pid)
                else:
                    raise DataInfError(
                        f"store {store} is being written by process {pid} on host {host}; "
                        f"wait for it or remove {lock} if that process is gone"
                    )
            atomic.write_text(lock, json.dumps(mine), fsync=True)  # replaces a stale lock in one rename
    except filelock.Timeout:
        raise DataInfError(
            f"store {store}: another process has held {store / WRITER_LOCK} for {LOCK_TIMEOUT_S:g} s; "
            "is a writer of this store stuck?"
        ) from None
    return mine


def release_lock(lock: Path, token: str) -> None:
    """Remove the lock file if it is still ours (called on close, on exit and at garbage collection)."""
    def ours() -> bool:
        try:
            held = parse_json(lock.read_bytes(), str(lock))
        except (OSError, ValueError):
            return False
        # (a forked child carries the token but is not the holder)
        return isinstance(held, dict) and held.get("token") == token and held.get("pid") == os.getpid()

    if not ours():
        return
    try:
        with _writer_lock(lock.parent, timeout=10):
            if ours():
                lock.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - at interpreter exit or on a read-only store: ours alone, so remove it
        lock.unlink(missing_ok=True)
