"""Methods' fitted states, cached inside a training store.

A method that fits a query-independent state once (:meth:`datainf.estimators.Estimator.fit`: K-FAC/EK-FAC's
curvature, DataInf's and exact's d x d matrices of small blocks, any method you register) gets it here:
:func:`fitted_state` reads ``<store>/<state_file>`` when it is sound and belongs to the store and the settings
the state depends on, else fits it and writes it there, atomically. The cache is one safetensors file: the
state's tensors, and in its metadata a JSON document with the method's ``state_format`` and
``state_version``, the state's own metadata, the store's fingerprints, the settings
(:meth:`~datainf.estimators.Estimator.state_settings`, when not empty), the fit's seconds, and the sha256
of all of it (:data:`datainf.store.CHECKSUM`), checked whenever it is read and by ``datainf store verify``
(:func:`state_problems`). A cache that fails its checksum is moved aside (``.NAME.corrupt-<time>-<pid>``,
never deleted) and fitted again; one made for other gradients or settings, or by another version of the
method's state, is simply fitted again (the file is ours to replace).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datainf import atomic
from datainf.distributed import is_main_process
from datainf.errors import DataInfError, parse_json
from datainf.estimators import Estimator, FittedState, ScoreArguments, get_method, method_names
from datainf.store import CHECKSUM, GradientStore
from datainf.store.files import STAMP_MARGIN_S, file_stamp

logger = logging.getLogger(__name__)

#: the keys of a cache's metadata that are the cache's own, not the state's
_OWN_KEYS = ("format", "version", "fingerprints", "settings", "fit_seconds", CHECKSUM)


class CorruptStateError(DataInfError):
    """A fitted-state cache that cannot be trusted: unreadable, or its content does not match its checksum."""


def state_digest(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> str:
    """sha256 of a cache's content: its metadata (without the digest) and every tensor's name, dtype, shape
    and bytes. Recorded in the file when it is written, checked whenever it is read."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"\n{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so that recorded settings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def save_state(path: str | os.PathLike, state: FittedState, *, method: type[Estimator],
               fingerprints: Mapping[str, str], settings: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` as ``method``'s cache at ``path`` (safetensors, atomically), with the fingerprints of
    the store it belongs to, the settings it was fitted under, the fit's seconds and the sha256 of it all."""
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in state.tensors.items()}
    own = {k: v for k, v in state.meta.items() if k not in _OWN_KEYS}  # the cache's own keys are set here
    meta: dict[str, Any] = {"format": method.state_format, "version": method.state_version,
                            **_json(own), "fingerprints": dict(fingerprints),
                            "fit_seconds": float(state.seconds)}
    if settings:
        meta["settings"] = _json(dict(settings))
    meta[CHECKSUM] = state_digest(tensors, meta)
    return atomic.save_safetensors(path, tensors, {"datainf": json.dumps(meta)})


def read_state_file(path: str | os.PathLike, formats: tuple[str, ...] | None = None, *,
                    store: GradientStore | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors) of a cache whose content matches its recorded sha256; raises
    :class:`CorruptStateError` for any other file (unreadable, not a cache of one of ``formats`` (default: any
    registered method's), no or a wrong checksum). With ``store`` (the store the cache lies in), a cache whose
    verified stamp there (size, mtime, ctime, inode, device and checksum, as a chunk file's) is unchanged since
    its sha256 last matched is trusted without hashing it again (126 MB for DataInf's state of a SmolLM2
    store: most of a warm one-query pass); any write to it changes its ctime and voids the stamp. A new
    stamp is recorded by ``store.save_verified()`` once the call succeeded."""
    from safetensors import safe_open

    path = Path(path)
    formats = formats or _known_formats()
    try:
        before = os.stat(path)
    except OSError as e:
        raise CorruptStateError(f"{path} is unreadable ({e.strerror or e})") from None
    started = time.time_ns()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = parse_json((f.metadata() or {}).get("datainf", "{}"), f"{path}'s metadata")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a damaged header
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CorruptStateError(f"{path} is unreadable ({reason})") from None
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        raise CorruptStateError(f"{path} is not a datainf fitted-state cache ({' or '.join(formats)})")
    recorded = meta.get(CHECKSUM)
    if recorded is None:
        raise CorruptStateError(f"{path} has no {CHECKSUM} checksum (written by an older datainf), so it cannot be "
                                "checked")
    stamp = [*file_stamp(before), recorded]
    unchanged = file_stamp(os.stat(path)) == stamp[:-1]  # not replaced or written while it was read
    if store is not None and unchanged and store.recorded_file(path.name) == stamp:
        return meta, tensors
    if state_digest(tensors, meta) != recorded:
        raise CorruptStateError(f"{path} does not match its {CHECKSUM} checksum (its bytes changed after it was "
                                "written)")
    if store is not None and unchanged and before.st_ctime_ns < started - int(STAMP_MARGIN_S * 1e9):
        store.note_verified_file(path.name, stamp)
    return meta, tensors


def load_state(path: str | os.PathLike, method: type[Estimator], *, fingerprints: Mapping[str, str] | None = None,
               settings: Mapping[str, Any] | None = None, store: GradientStore | None = None) -> FittedState:
    """Read ``method``'s cache at ``path`` (see :func:`save_state`). A file whose content does not match its
    checksum is refused (:class:`CorruptStateError`); with ``fingerprints`` / ``settings``, so is one made for
    another model, adapter, task or dataset, or under other settings, or by another version of the method's
    state (a plain :class:`DataInfError`: scoring fits such a state again)."""
    path = Path(path)
    if not path.is_file():
        raise DataInfError(f"no fitted state of method '{method.name}' at {path}")
    meta, tensors = read_state_file(path, (method.state_format,), store=store)
    if meta.get("version") != method.state_version:
        raise DataInfError(f"{path} holds version {meta.get('version')} of method '{method.name}''s state, not "
                           f"{method.state_version}; delete it to fit it again")
    saved = meta.get("fingerprints") or {}
    for key, value in (fingerprints or {}).items():
        if saved.get(key) != value:
            raise DataInfError(f"{path} was made with a different {key} (fingerprint {saved.get(key)} != {value}); "
                               f"delete it to fit method '{method.name}''s state for this store")
    if settings is not None and (meta.get("settings") or {}) != _json(dict(settings)):
        raise DataInfError(f"{path} was fitted with the settings {meta.get('settings') or {}}, not {_json(dict(settings))}")
    own = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    own["fingerprints"] = dict(saved)
    return FittedState(tensors, own, seconds=float(meta.get("fit_seconds", 0.0)), cached=True)


def set_aside(path: Path, reason: str) -> Path:
    """Move a bad cache file aside (``.NAME.corrupt-<time>-<pid>``, never deleted) and say so."""
    aside = path.with_name(f".{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    logger.warning("%s; moved it to %s and fitting the state again", reason, aside.name)
    return aside


def fitted_state(store: GradientStore, arguments: ScoreArguments, *, save: bool = True) -> FittedState | None:
    """The fitted state of ``arguments.method`` for ``store``'s gradients: read from ``<store>/<state_file>``
    when its content matches its checksum and it was made for this store's fingerprints and the method's
    :meth:`~datainf.estimators.Estimator.state_settings`; else fitted (``Estimator.fit`` over the store's
    memory-mapped blocks) and, with ``save``, written there by the main process (a file that fails its
    checksum is moved aside first, like a bad chunk). ``save=False`` leaves the writing to :func:`cache_state`
    (scoring writes the cache only once the scores came out right, so a refused call changes nothing in the
    store). None for a method without a fitted state. ``state.cached`` says whether it was read back."""
    method = get_method(arguments.method)
    if method.state_file is None:
        return None
    path = Path(store.path) / method.state_file
    settings = method.state_settings(arguments)
    if path.exists():
        try:
            return load_state(path, method, fingerprints=store.fingerprints, settings=settings, store=store)
        except CorruptStateError as e:
            if is_main_process():
                set_aside(path, str(e))
        except DataInfError:
            pass  # made for another store content, other settings or another version: refit below
    t0 = time.perf_counter()
    blocks = store.blocks()
    state = method.fit([(name, blocks[name]) for name in store.block_names], arguments)
    if state is None:
        return None
    state.seconds = state.seconds or time.perf_counter() - t0
    state.tensors = {key: t.contiguous() for key, t in state.tensors.items()}  # laid out as the cache holds
    state.meta["fingerprints"] = dict(store.fingerprints)  # them, so a fit just made and the cache give the
    if save:  # same products
        cache_state(store, arguments, state)
    return state


def cache_state(store: GradientStore, arguments: ScoreArguments, state: FittedState) -> None:
    """Write a state :func:`fitted_state` fitted (not one it read back) as the store's cache, from the main
    process only; a store that cannot take it (read-only, a full disk) is only warned about."""
    method = get_method(arguments.method)
    if state.cached or method.state_file is None or not is_main_process():
        return
    path = Path(store.path) / method.state_file
    try:
        save_state(path, state, method=method, fingerprints=store.fingerprints,
                   settings=method.state_settings(arguments))
    except OSError as e:  # the scores do not need the cache
        logger.warning("could not cache method '%s''s fitted state as %s (%s); it is fitted again next time",
                       method.name, path, e.strerror or e)


def _state_owners() -> dict[str, list[type[Estimator]]]:
    """Cache file name -> the registered methods that keep their fitted state in it."""
    owners: dict[str, list[type[Estimator]]] = {}
    for name in method_names():
        cls = get_method(name)
        if cls.state_file is not None:
            owners.setdefault(cls.state_file, []).append(cls)
    return owners


def _known_formats() -> tuple[str, ...]:
    return tuple(sorted({cls.state_format for owners in _state_owners().values() for cls in owners}
                        | {Estimator.state_format}))


def state_files(store: GradientStore | str | os.PathLike) -> list[Path]:
    """The fitted-state caches inside a store: every registered method's ``state_file`` that exists, and any
    other ``fitted-*.safetensors`` (a method registered by a program that is not running now)."""
    root = Path(store.path if isinstance(store, GradientStore) else store)
    found = {root / name for name in _state_owners() if (root / name).is_file()}
    found |= {p for p in root.glob("fitted-*.safetensors") if p.is_file()}
    return sorted(found)


def state_problems(store: GradientStore) -> list[str]:
    """What is wrong with the fitted-state caches inside a store (an empty list when every one is sound or
    there is none): what ``datainf store verify`` reports; scoring would move such a file aside and refit.
    A sound cache made for other gradients or settings is no problem (scoring refits it, never uses it)."""
    owners = _state_owners()
    problems = []
    for path in state_files(store):
        methods = [cls.name for cls in owners.get(path.name, [])]
        what = f"the fitted state of {', '.join(methods)}" if methods else "a fitted-state cache"
        formats = tuple(sorted({cls.state_format for cls in owners.get(path.name, [])})) or None
        try:
            read_state_file(path, formats)
        except CorruptStateError as e:
            problems.append(str(e).replace(f"{path} ", f"{path.name} ({what}) ", 1))
    return problems


def state_hint(problem_files: list[str]) -> str:
    """What fixes the caches :func:`state_problems` named: the scoring call that moves them aside and refits."""
    owners = _state_owners()
    names = sorted({cls.name for file in problem_files for cls in owners.get(file, [])})
    run = f"`datainf score --method {names[0]}`" if names else "scoring with its method"
    return f"the next {run} on this store moves the bad cache aside and fits it again"


# --------------------------------------------------------------------------------------------------
# K-FAC curvature through the hook (the names earlier releases exported from datainf.scoring)
# --------------------------------------------------------------------------------------------------


def curvature_for(store: GradientStore, *, chunk_size: int = 2048) -> tuple[Any, float]:
    """EK-FAC / K-FAC curvature of a store's blocks (:class:`~datainf.estimators.kfac.KFACCurvature`), through
    the fit hook and its cache (``<store>/kfac.safetensors``). Returns (curvature, seconds of the fit)."""
    from datainf.estimators.kfac import curvature_from_state

    state = fitted_state(store, ScoreArguments(method=_kfac().name, chunk_size=chunk_size))
    assert state is not None
    return curvature_from_state(state), state.seconds


def save_curvature(curvature: Any, path: str | os.PathLike, *, fingerprints: Mapping[str, str],
                   fit_seconds: float = 0.0, breakdown: Mapping[str, float] | None = None) -> Path:
    """Write a K-FAC curvature as the cache :func:`curvature_for` reads (checksummed, atomically)."""
    from datainf.estimators.kfac import curvature_to_state

    curvature.fingerprints = dict(fingerprints)
    return save_state(path, curvature_to_state(curvature, fit_seconds, breakdown), method=_kfac(),
                      fingerprints=fingerprints)


def load_curvature(path: str | os.PathLike, *, fingerprints: Mapping[str, str] | None = None) -> tuple[Any, float]:
    """Read a file of :func:`save_curvature`: (curvature, seconds its fit took); refused like
    :func:`load_state`."""
    from datainf.estimators.kfac import curvature_from_state

    state = load_state(path, _kfac(), fingerprints=fingerprints)
    return curvature_from_state(state), state.seconds


def _kfac() -> type[Estimator]:
    from datainf.estimators.kfac import EKFAC

    return EKFAC


__all__ = [
    "CorruptStateError",
    "cache_state",
    "curvature_for",
    "fitted_state",
    "load_curvature",
    "load_state",
    "read_state_file",
    "save_curvature",
    "save_state",
    "set_aside",
    "state_digest",
    "state_files",
    "state_hint",
    "state_problems",
]
