"""dattri's DataInf attributor (IFAttributorDataInf) on the peer benchmark, in its own process and venv:

    .peers-venv/bin/python benchmarks/peers/run_dattri.py

Blocks: dattri's layer_name = the trainable parameters (LoRA A/B and the head), each its own layer as in
datainf. dattri takes ONE regularization for all layers: we pass the mean of datainf's paper-rule damping
(from result-ours-datainf.json; its cost not counted). Examples are padded to max_length 64 (dattri vmaps
over a stacked tensor). Scores: dattri's train x test matrix g_train^T H^-1 g_test averaged over the
validation set and NEGATED to datainf's sign (positive = harmful).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from common import TensorClassifier, Timer, load_data, load_model, our_damping, padded_tensors, write_result
from dattri.algorithm.influence_function import IFAttributorDataInf
from dattri.task import AttributionTask
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    logging.disable(logging.WARNING)
    timer = Timer()
    data = load_data()
    peft_model, tokenizer = load_model()
    model = TensorClassifier(peft_model).eval()
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def loss_func(params, batch):
        x, y = batch
        logits = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(logits, y)

    params = {k: v.detach() for k, v in model.named_parameters()}
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=params)
    regularization = float(np.mean(list(our_damping().values())))
    attributor = IFAttributorDataInf(task, layer_name=names, device="cpu", regularization=regularization)
    train = DataLoader(TensorDataset(*padded_tensors(tokenizer, data["train"])), batch_size=32)
    val = DataLoader(TensorDataset(*padded_tensors(tokenizer, data["val"])), batch_size=200)
    attributor.cache(train)
    with torch.no_grad():
        scores = attributor.attribute(train, val)  # (n_train, n_val)
    s = (-scores.double().mean(dim=1)).numpy()
    write_result("dattri-datainf", {"dattri-datainf": s}, {"dattri-datainf": timer()},
                 {"regularization": regularization, "layers": names})


if __name__ == "__main__":
    main()
