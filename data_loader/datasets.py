"""Datasets the config can name (data_loader.dataset.type): any torch.utils.data.Dataset defined in a file of
this package, returning one sample per index; the template splits, shuffles, batches and transforms it."""
import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from utils.errors import DataError


class DigitsDataset(TensorDataset):
    """UCI handwritten digits: 1797 (1x8x8 image in [0, 1], label) pairs from data/digits.csv.gz, in memory."""

    def __init__(self, root="data/"):
        path = Path(root) / "digits.csv.gz"
        if not path.is_file():
            raise DataError(f"data_loader.dataset.args.root: {path} not found "
                            "(the digits file ships in the repo's data/)")
        try:
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise DataError(f"{path}: unreadable (truncated or corrupt?): {str(e)[:200]}") from None
        if table.shape[1] != 65:
            raise DataError(f"{path}: expected 65 columns (64 pixels and a label), got {table.shape[1]}")
        images = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8) / 16.0
        super().__init__(images, torch.from_numpy(table[:, 64]).long())
