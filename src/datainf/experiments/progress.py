"""The work a long experiment keeps in its output folder while it runs, so that a run stopped part-way (a killed
process, a session's end) picks up where it stopped when it is started again with the same settings.

A fine-tune at the paper's sizes is half an hour to an hour of one CPU core, and each checkpoint's training
gradients another ten minutes; without this, a run stopped at its last checkpoint starts again from nothing.

``OUT/progress/`` holds ``key.json`` (what the run is: its settings, the model's fingerprint before training,
the data's) and, once the fine-tune is done, ``finetune.safetensors`` (the trainable weights at step 0, at each
snapshot and at the end) with ``finetune.json`` (the snapshots' steps and rates, the fine-tune's statistics). A
run started with another key removes the folders of the earlier run's work (its progress and gradient
stores, named by the caller) before it begins; a run with the same key reuses the fine-tune and the gradient
stores, which resume chunk by chunk (:meth:`datainf.attributor.Attributor.fit`). The folder is removed once
the run's results are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from datainf import atomic
from datainf.errors import DataInfError
from datainf.models.checkpoints import Snapshots

log = logging.getLogger("datainf.experiments")

#: the folder of a run's kept work inside its output folder
PROGRESS = "progress"


def run_key(**parts: Any) -> str:
    """A digest of what a run is (JSON-encodable parts; objects JSON cannot encode are written with str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class RunProgress:
    """A run's kept work in ``out/progress`` (see the module docstring).

    ``resumed`` says whether the folder held the work of a run with this ``key``; when it did not, ``work``
    (the caller's folders of kept work, such as gradient stores, relative to ``out``) are removed with any
    earlier progress, and ``key.json`` is written before anything else is computed."""

    def __init__(self, out: Path, key: str, work: tuple[str, ...] = ()) -> None:
        self.folder = out / PROGRESS
        self.key = key
        try:
            recorded = json.loads((self.folder / "key.json").read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            if self.folder.exists():  # not a folder this module wrote: never remove what datainf did not create
                raise DataInfError(f"{self.folder} exists and is not a run's kept work written by datainf (no "
                                   "readable key.json); choose a new --out folder, or move it away") from None
            recorded = None
        self.resumed = recorded == key
        if not self.resumed:
            for name in (PROGRESS, *work):
                shutil.rmtree(out / name, ignore_errors=True)
            self.folder.mkdir(parents=True)
            atomic.write_json(self.folder / "key.json", {"key": key})
        else:
            log.info("resuming the run kept in %s", self.folder)

    def save_finetune(self, snapshots: Snapshots, info: dict[str, Any]) -> None:
        """Keep the fine-tune: every state of ``snapshots`` (step 0 when taken, each snapshot, and the model's
        weights now, its final ones) with the rates of every step, and ``info`` (JSON: its statistics)."""
        tensors = {f"final/{n}": t.contiguous() for n, t in snapshots.current().items()}
        if snapshots.initial is not None:
            tensors |= {f"initial/{n}": t.contiguous() for n, t in snapshots.initial.items()}
        for step, _, state in snapshots.taken:
            tensors |= {f"step{step}/{n}": t.contiguous() for n, t in state.items()}
        atomic.save_safetensors(self.folder / "finetune.safetensors", tensors)
        atomic.write_json(self.folder / "finetune.json", {
            "taken": [[step, lr] for step, lr, _ in snapshots.taken], "rates": snapshots.rates,
            "initial": snapshots.initial is not None, "info": info})

    def load_finetune(self, snapshots: Snapshots) -> dict[str, Any] | None:
        """The kept fine-tune put back: ``snapshots`` as the fine-tune left them, the model given its final
        weights; returns the ``info`` saved with it, or None when this run has none kept (nothing changed)."""
        if not self.resumed:
            return None
        try:
            record = json.loads((self.folder / "finetune.json").read_text())
            from safetensors.torch import load_file

            tensors = load_file(str(self.folder / "finetune.safetensors"))
        except (OSError, ValueError):
            return None

        def state(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}

        final = state("final")
        if not final or set(final) != set(snapshots.current()):
            return None
        snapshots.rates = [float(r) for r in record["rates"]]
        snapshots.taken = [(int(step), float(lr), state(f"step{int(step)}")) for step, lr in record["taken"]]
        if record.get("initial"):
            snapshots.initial = state("initial")
        snapshots.load(final)
        log.info("fine-tune reused from %s", self.folder)
        return dict(record["info"])

    def finish(self) -> None:
        """The run's results are written: its kept work is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["PROGRESS", "RunProgress", "run_key"]
