"""Data loaders named by `data_loader.type` in the config.

Each class builds its datasets and iterates the training split (or the test split with
training=False); split_validation() returns a loader over the validation split. `seed` is
passed in by train.py from the config's top-level `seed`, so the split is fixed by it.
"""
import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from base import BaseDataLoader
from utils.errors import DataError


def _split_indices(n, fractions, seed):
    """Disjoint random index sets of the given fractions of n, then the rest; fixed by `seed`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions:
        size = int(round(n * fraction))
        parts.append(order[start:start + size].sort().values)
        start += size
    parts.append(order[start:].sort().values)
    return parts


class _SplitDataLoader(BaseDataLoader):
    """Shared by the loaders below: train/validation/test TensorDatasets, one of them iterated."""

    def __init__(self, train_set, valid_set, test_set, batch_size, shuffle, num_workers, training, seed):
        self.valid_set = valid_set
        self.split_args = dict(batch_size=batch_size, num_workers=num_workers, seed=seed)
        dataset = train_set if training else test_set
        super().__init__(dataset, batch_size, shuffle and training, num_workers, seed, even_shards=training)

    def split_validation(self):
        """A loader over the validation split, in a fixed order; None when the split is empty."""
        if self.valid_set is None or len(self.valid_set) == 0:
            return None
        return BaseDataLoader(self.valid_set, shuffle=False, even_shards=False, **self.split_args)


def _subset(tensors, idx):
    return TensorDataset(*(t[idx] for t in tensors))


class DigitsDataLoader(_SplitDataLoader):
    """UCI handwritten digits (1797 8x8 images, 10 classes) from data/digits.csv.gz; held in memory."""

    def __init__(self, data_dir, batch_size, shuffle=True, validation_split=0.1, test_split=0.1,
                 num_workers=0, training=True, seed=0):
        path = Path(data_dir) / "digits.csv.gz"
        if not path.is_file():
            raise DataError(f"data_loader.args.data_dir: {path} not found (the digits file ships in the repo's data/)")
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        images = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8) / 16.0
        labels = torch.from_numpy(table[:, 64]).long()
        valid_idx, test_idx, train_idx = _split_indices(len(labels), [validation_split, test_split], seed)
        tensors = (images, labels)
        super().__init__(_subset(tensors, train_idx), _subset(tensors, valid_idx), _subset(tensors, test_idx),
                         batch_size, shuffle, num_workers, training, seed)


def _load_torchvision(name, data_dir, download, train):
    """A torchvision MNIST-style dataset as in-memory tensors, or one clear error when absent."""
    import torchvision  # imported here: it is slow to import and only these datasets need it

    cls = getattr(torchvision.datasets, name)
    try:
        dataset = cls(data_dir, train=train, download=download)
    except Exception as e:  # no network, or files missing with download off
        files = ", ".join(Path(url).name for url, _ in cls.resources)
        raise DataError(f"{name} not found in {Path(data_dir) / name / 'raw'} and could not be downloaded "
                        f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                        f"put these files there: {files}") from None
    images = dataset.data.unsqueeze(1).float().div_(255.0).sub_(0.1307).div_(0.3081)
    return images, dataset.targets.long()


class MnistDataLoader(_SplitDataLoader):
    """MNIST via torchvision, held in memory as normalized tensors; validation taken from the training set."""

    dataset_name = "MNIST"

    def __init__(self, data_dir, batch_size, shuffle=True, validation_split=0.1, num_workers=0,
                 training=True, download=True, seed=0):
        train_tensors = _load_torchvision(self.dataset_name, data_dir, download, train=True)
        valid_idx, train_idx = _split_indices(len(train_tensors[1]), [validation_split], seed)
        test_set = TensorDataset(*_load_torchvision(self.dataset_name, data_dir, download, train=False)) \
            if not training else None
        super().__init__(_subset(train_tensors, train_idx), _subset(train_tensors, valid_idx), test_set,
                         batch_size, shuffle, num_workers, training, seed)


class FashionMnistDataLoader(MnistDataLoader):
    """Fashion-MNIST via torchvision; same layout and arguments as MnistDataLoader."""

    dataset_name = "FashionMNIST"
