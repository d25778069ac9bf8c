"""What a store's manifest says about its gradients beyond their layout: the ``meta`` of manifest.json, typed.

:class:`StoreMeta` is the one reader of that mapping (``GradientStore.metadata``, or :meth:`StoreMeta.of` for a
manifest read from disk) and its one writer's form (:meth:`StoreMeta.to_dict`). The schema, key by key:

- ``task``: the task's name ("classification", "causal_lm", "causal_lm_mean", or a callable's name);
- ``task_fingerprint``: the fingerprint of the loss (also in ``fingerprints.task``);
- ``blocks_tracked``: how many parameter blocks the gradients cover;
- ``collate``: the collator's settings (max_length, chat_template, assistant_turns, loss_tokens, ...), or the
  name of a collate callable of one's own;
- ``labels``: classification only, ``{"names": [...] or null, "num_labels": int or null}``, the class mapping;
- ``nonfinite``: ``{"dropped": [{"row": i, ...}, ...]}``, the examples left out for a non-finite loss;
- ``truncated``: ``{"examples", "max_length", "longest", "longest_is_a_lower_bound"}`` when examples were cut;
- ``preconditioned``: a store written by ``datainf store precondition``: ``{"method", "options", "damping",
  "scale", "source", "source_fingerprints", "curvature_seconds", "seconds"}``.

Any other key is kept, untouched, in ``extra``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datainf.errors import DataInfError

_KNOWN = ("task", "task_fingerprint", "blocks_tracked", "collate", "labels", "nonfinite", "truncated",
          "preconditioned")


@dataclass(frozen=True)
class StoreMeta:
    """The typed ``meta`` of a store's manifest (see the module docstring for each field)."""

    task: str | None = None
    task_fingerprint: str | None = None
    blocks_tracked: int | None = None
    collate: dict[str, Any] | str | None = None
    labels: dict[str, Any] | None = None
    nonfinite: dict[str, Any] | None = None
    truncated: dict[str, Any] | None = None
    preconditioned: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, meta: Mapping[str, Any] | None, where: str = "the store") -> StoreMeta:
        """The typed form of a manifest's ``meta`` mapping; a value of the wrong kind is one line naming it."""
        meta = dict(meta or {})
        for key in ("labels", "nonfinite", "truncated", "preconditioned"):
            if meta.get(key) is not None and not isinstance(meta[key], Mapping):
                raise DataInfError(f"{where}: manifest.json's meta.{key} is not a mapping; recompute the store")
        if meta.get("task") is not None and not isinstance(meta["task"], str):
            raise DataInfError(f"{where}: manifest.json's meta.task is not a name; recompute the store")
        return cls(**{k: meta[k] for k in _KNOWN if meta.get(k) is not None},
                   extra={k: v for k, v in meta.items() if k not in _KNOWN})

    @classmethod
    def of(cls, manifest: Mapping[str, Any] | None, where: str = "the store") -> StoreMeta:
        """The typed ``meta`` of a whole manifest mapping (one read from disk, not yet opened as a store)."""
        return cls.read((manifest or {}).get("meta") if isinstance(manifest, Mapping) else None, where)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's form: the fields that are set, then the extra keys (``read(m).to_dict() == m``)."""
        out = {k: getattr(self, k) for k in _KNOWN if getattr(self, k) is not None}
        return {**out, **self.extra}

    def replace(self, **changes: Any) -> StoreMeta:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def label_names(self) -> list[str] | None:
        """The class names of a classification store (None when it records none)."""
        names = (self.labels or {}).get("names")
        return list(names) if isinstance(names, list) else None

    @property
    def num_labels(self) -> int | None:
        count = (self.labels or {}).get("num_labels")
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    @property
    def dropped(self) -> list[dict[str, Any]]:
        """The examples left out for a non-finite loss: [{"row": i, ...}, ...] (empty when none)."""
        return list((self.nonfinite or {}).get("dropped") or [])

    @property
    def dropped_rows(self) -> list[int]:
        return [int(d["row"]) for d in self.dropped]


__all__ = ["StoreMeta"]
