"""The image report of the diffusion experiments: each query image beside its most helpful and most harmful
training images, after a table of each method's metrics. One self-contained HTML file (base64 PNGs inline)."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from datainf import atomic
from datainf.report.render import render

if TYPE_CHECKING:
    from torch import Tensor


def image_png(image: Tensor) -> str:
    """A (1, H, W) image in [-1, 1] as a base64 PNG data URI."""
    import matplotlib.image

    array = ((image.detach().float().cpu()[0] + 1) / 2).clamp(0, 1).numpy()
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, array, cmap="gray", vmin=0, vmax=1, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_image_report(path: str | os.PathLike, *, results: dict, train: list[dict], test: list[dict],
                       scores: np.ndarray, method: str, group_key: str, top_k: int = 5,
                       max_queries: int = 30) -> Path:
    """Self-contained HTML: a table of each method's metrics, then each query image beside its ``top_k`` most
    helpful and most harmful training images under ``method`` (green border: same style/subject). The markup
    is the template ``report/templates/images.html.j2``; the page is written atomically."""
    path = Path(path)
    methods = []
    for m, r in results["methods"].items():
        paper = results.get("paper", {}).get(m, {})
        methods.append([m, f"{r['auc']:.3f}", f"{r['recall']:.3f}", f"{r['top1']:.3f}", f"{r['seconds']:.2f}",
                        paper.get("auc", "n/a"), paper.get("recall", "n/a")])
    first = next(iter(results["methods"].values()))
    queries = []
    for j, q in enumerate(test[:max_queries]):
        col = scores[:, j]
        lists = []
        for label, order in (("helpful", np.argsort(col)[:top_k]), ("harmful", np.argsort(-col)[:top_k])):
            lists.append({"label": label, "figures": [
                {"image": image_png(train[i]["image"]), "same": train[i][group_key] == q[group_key],
                 "index": int(i), "score": f"{col[i]:+.2e}"} for i in order]})
        queries.append({"prompt": q["prompt"], "image": image_png(q["image"]), "number": j,
                        "group": str(q[group_key]), "lists": lists})
    text = render("images.html.j2", experiment=results["experiment"], n_train=results["n_train"],
                  n_test=results["n_test"], image_size=results["image_size"], group_key=group_key,
                  chance_top1=f"{first['chance_top1']:.3f}", chance_recall=f"{first['chance_recall']:.3f}",
                  methods=methods, method=method, queries=queries,
                  settings=json.dumps(results.get("settings", {}), default=str))
    atomic.write_text(path, text)
    return path


__all__ = ["image_png", "write_image_report"]
