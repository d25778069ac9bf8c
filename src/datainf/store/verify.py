"""Checking a whole store: :class:`StoreVerifier` (``datainf store verify``: every chunk's layout, every file's
sha256, every example's squared norms against its stored gradients, and the records)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.store.files import ROUNDING, norms_tolerance
from datainf.store.manifest import StoreProblem, problem_line
from datainf.store.reader import StoreReader


class StoreVerifier(StoreReader):
    """The verification of :class:`datainf.store.GradientStore`."""

    def verify(self) -> list[StoreProblem]:
        """Check everything: every chunk (as :meth:`open` does, plus every file's sha256 and every example's
        squared norms recomputed from its stored gradients) and records.jsonl. Returns one line per problem,
        each naming its chunk (``.chunk``: its index, None for a problem of the manifest or records; empty when
        the store is sound)."""
        problems = self._layout_problems(checksums=True)
        bad = {i for i, _ in problems}
        for i in range(self.num_chunks):
            if i in bad or None in bad or not self._chunk_dir(i).is_dir():
                continue
            problem = self._norms_problem(i)
            if problem is not None:
                problems.append((i, problem))
        lines = [StoreProblem(problem_line(i, text), chunk=i) for i, text in problems]
        if not self.complete:
            missing = self.missing_chunks()
            lines.append(StoreProblem(f"the store is not finished: {len(missing)} of {self.num_chunks} chunks "
                                      "are not written yet"))
        try:
            self.records()
        except DataInfError as e:
            lines.append(StoreProblem(str(e).replace(f"store {self.path}: ", "")))
        return lines

    def _norms_problem(self, index: int) -> str | None:
        """Whether sq_norms.npy agrees with the chunk's stored gradients (up to the storage rounding)."""
        try:
            sq = np.asarray(self.mapped(index, "sq_norms.npy", verify=False), dtype=np.float64)
            for j, name in enumerate(self.block_names):
                stored = self._to_work(self.mapped(index, self.block_file(name), verify=False))
                if not bool(torch.isfinite(stored).all()):
                    return f"{self.block_file(name)} holds a NaN or infinite value"
                got = (stored.double() ** 2).sum(dim=1).numpy()
                if self.storage_dtype in ROUNDING:  # what rounding each entry to nearest can change, no more
                    allowed = norms_tolerance(sq[:, j], stored.shape[1], self.storage_dtype)
                else:  # the stored values are those whose squared norms were recorded: summation order only
                    tol = {"float64": 1e-9, "float32": 1e-4}[self.storage_dtype]
                    allowed = tol * np.abs(sq[:, j])
                off = np.abs(got - sq[:, j]) > allowed
                if off.any():
                    k = int(np.flatnonzero(off)[0])
                    return (f"sq_norms.npy disagrees with {self.block_file(name)} (example "
                            f"{self.chunk_rows(index).start + k}: {sq[k, j]:.6g} recorded, {got[k]:.6g} stored)")
        except DataInfError as e:
            return str(e)
        return None

    def _to_work(self, array: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(array))
        if self.storage_dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.to(torch.float64 if self.storage_dtype == "float64" else torch.float32)
