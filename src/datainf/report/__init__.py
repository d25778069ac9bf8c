"""Self-contained HTML report of an influence run (inline CSS, base64 PNG plots, no JavaScript)."""

from datainf.report.html import render_report, write_report
from datainf.report.plots import histogram_png, roc_auc, roc_curve_png, roc_points

__all__ = ["histogram_png", "render_report", "roc_auc", "roc_curve_png", "roc_points", "write_report"]
