"""The image report of the diffusion experiments: each query image beside its most helpful and most harmful
training images, after a table of each method's metrics. One self-contained HTML file (base64 PNGs inline)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from datainf import atomic

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
    helpful and most harmful training images under ``method`` (green border: same style/subject)."""
    path = Path(path)
    rows = []
    for m, r in results["methods"].items():
        paper = results.get("paper", {}).get(m, {})
        rows.append(
            f"<tr><td>{html.escape(m)}</td><td>{r['auc']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['top1']:.3f}</td>"
            f"<td>{r['seconds']:.2f}</td><td>{paper.get('auc', 'n/a')}</td><td>{paper.get('recall', 'n/a')}</td></tr>")
    first = next(iter(results["methods"].values()))
    queries = []
    for j, q in enumerate(test[:max_queries]):
        col = scores[:, j]
        cells = [f"<figure><img src='{image_png(q['image'])}'><figcaption>query {j}<br>"
                 f"{html.escape(str(q[group_key]))}</figcaption></figure><span class='sep'></span>"]
        for label, order in (("helpful", np.argsort(col)[:top_k]), ("harmful", np.argsort(-col)[:top_k])):
            for i in order:
                same = train[i][group_key] == q[group_key]
                cells.append(f"<figure class='{'same' if same else 'other'}'><img src='{image_png(train[i]['image'])}'>"
                             f"<figcaption>{label}<br>#{i} {col[i]:+.2e}</figcaption></figure>")
            cells.append("<span class='sep'></span>")
        queries.append(f"<div class='row'><p>{html.escape(q['prompt'])}</p>{''.join(cells)}</div>")
    settings = html.escape(json.dumps(results.get("settings", {}), default=str))
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>datainf: {html.escape(results['experiment'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;margin:2px;text-align:center;font-size:10px;border:3px solid transparent}}
figure.same{{border-color:#2a2}} figure.other{{border-color:#c33}}
img{{width:64px;height:64px;image-rendering:pixelated}} .sep{{display:inline-block;width:16px}}
.row p{{margin:.8em 0 .2em}}</style></head><body>
<h1>datainf: {html.escape(results['experiment'])}</h1>
<p>{results['n_train']} training images, {results['n_test']} queries, image size {results['image_size']}.
Training images are ranked by helpfulness (-score); AUC and recall@k (k = number of same-{group_key} training
images) are averaged over queries; top1 = share of queries whose most helpful image has the same {group_key}
(chance: {first['chance_top1']:.3f}; chance recall {first['chance_recall']:.3f}).</p>
<table><tr><th>method</th><th>AUC</th><th>recall@k</th><th>top1</th><th>seconds</th><th>paper AUC</th>
<th>paper recall</th></tr>{''.join(rows)}</table>
<h2>Queries and their most helpful / harmful training images ({html.escape(method)})</h2>
<p>Green border: same {group_key} as the query; red: different. Scores: positive = harmful.</p>
{''.join(queries)}
<h2>Settings</h2><pre>{settings}</pre></body></html>"""
    atomic.write_text(path, text)
    return path


__all__ = ["image_png", "write_image_report"]
