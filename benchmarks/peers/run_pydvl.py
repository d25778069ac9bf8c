"""pyDVL's InverseHarmonicMeanInfluence (its DataInf) on the peer benchmark, in its own process and venv:

    .peers-venv/bin/python benchmarks/peers/run_pydvl.py

Blocks: one per trainable parameter (LoRA A/B and the head), as in datainf, each with datainf's
paper-rule damping averaged into one value (read from result-ours-datainf.json; its cost not counted;
a per-block dict is refused by a pyDVL bug, see below). Examples padded to 64
tokens. Scores: pyDVL's <H^-1 g_test, g_train> for the validation set, averaged over it and NEGATED to
datainf's sign (positive = harmful).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from common import TensorClassifier, Timer, load_data, load_model, our_damping, padded_tensors, write_result
from pydvl.influence.torch import InverseHarmonicMeanInfluence
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    logging.disable(logging.WARNING)
    timer = Timer()
    data = load_data()
    peft_model, tokenizer = load_model()
    model = TensorClassifier(peft_model).eval()
    damping = our_damping()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    blocks = OrderedDict((name, [name]) for name in names)
    # pyDVL 0.10.0 refuses every per-block dict (its check `if set(keys).issubset(block_names): raise` is
    # inverted, influence/torch/base.py:751), so it gets one float: the mean of datainf's per-block damping
    regularization = float(np.mean(list(damping.values())))
    influence = InverseHarmonicMeanInfluence(model, F.cross_entropy, regularization=regularization,
                                             block_structure=blocks)
    x, y = padded_tensors(tokenizer, data["train"])
    influence.fit(DataLoader(TensorDataset(x, y), batch_size=32))
    xv, yv = padded_tensors(tokenizer, data["val"])
    # the inverse-harmonic-mean transform of the validation gradients once (one pass over the training
    # loader), then its products with the training gradients, 32 at a time
    factors = influence.influence_factors(xv, yv)
    parts = [influence.influences_from_factors(factors, x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    scores = torch.cat(parts, dim=1)  # (n_val, n_train)
    s = (-scores.double().mean(dim=0)).numpy()
    write_result("pydvl-datainf", {"pydvl-datainf": s}, {"pydvl-datainf": timer()}, {"blocks": names, "regularization": regularization})


if __name__ == "__main__":
    main()
