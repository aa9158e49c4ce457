"""BaseDataLoader: batches of one dataset split in an order that is a pure function of (seed, epoch).

Because the order depends on nothing else, resuming needs only the epoch and the number of
batches already taken: no generator state, and no replay of the batches already done.
"""
import math
import signal

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import utils.dist as dist


class EpochBatchSampler:
    """Index batches for one epoch: a seeded permutation (or 0..n-1), cut into batches.

    With world_size > 1 each rank takes every world_size-th index of the shared order, as
    torch's DistributedSampler does, so the ranks' batches together form the batches a single
    process with world_size times the batch size would see. With even_shards the order is first
    padded by repeating its start, so every rank has the same number of batches (training needs
    that: each step is a collective); evaluation leaves it off and counts every sample once.
    """

    def __init__(self, n, batch_size, shuffle, seed=0, drop_last=False, rank=0, world_size=1, even_shards=True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.padded_n = -(-n // world_size) * world_size if even_shards else n
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already done (set when resuming mid-epoch)

    def indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.padded_n > self.n:
            order = torch.cat([order, order[:self.padded_n - self.n]])
        return order[self.rank::self.world_size]

    def __len__(self):
        n_local = len(range(self.rank, self.padded_n, self.world_size))
        return n_local // self.batch_size if self.drop_last else math.ceil(n_local / self.batch_size)

    def __iter__(self):
        indices = self.indices()
        batches = indices.split(self.batch_size) if len(indices) else ()  # split() of nothing is one empty batch
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        # Not reset here: torch's DataLoader may call iter() on its sampler twice per pass.
        return iter(batches[self.start_batch:])


def _ignore_stop_signals(worker_id):
    """In DataLoader workers: leave SIGINT / SIGTERM to the main process, which finishes the step and
    saves; a scheduler or Ctrl-C signalling the whole process group must not kill the workers first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BaseDataLoader:
    """Iterates (data, target) batches of `dataset` in the order of an EpochBatchSampler.

    A TensorDataset is batched by tensor indexing (no per-sample collation); any other dataset
    goes through torch's DataLoader with `num_workers` worker processes.
    Call set_epoch(epoch) before each pass to get that epoch's order. Under torchrun each process
    iterates its own shard (see EpochBatchSampler); `even_shards=False` is for evaluation loaders.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                 seed: int = 0, drop_last: bool = False, pin_memory=None, even_shards: bool = True):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last,
                                         rank=dist.rank(), world_size=dist.world_size(), even_shards=even_shards)
        # Pinned host memory only pays off when batches are copied to a GPU.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._loader = None
        if not isinstance(dataset, TensorDataset) or num_workers > 0:
            # Its own generator: worker seeds must not draw from (and so shift) the global RNG,
            # or a resumed run would see different dropout masks than an uninterrupted one.
            self._loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                      pin_memory=self.pin_memory, persistent_workers=num_workers > 0,
                                      generator=torch.Generator().manual_seed(seed),
                                      worker_init_fn=_ignore_stop_signals)

    @property
    def n_samples(self) -> int:
        """Samples in the whole dataset (all processes together)."""
        return len(self.dataset)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use `epoch`'s order on the next pass, beginning after its first `start_batch` batches."""
        self.sampler.epoch = epoch
        self.sampler.start_batch = start_batch

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        if self._loader is not None:
            return iter(self._loader)
        return self._iter_tensors()

    def _iter_tensors(self):
        tensors = self.dataset.tensors
        for idx in self.sampler:
            batch = [t[idx] for t in tensors]
            if self.pin_memory:
                batch = [t.pin_memory() for t in batch]
            yield tuple(batch)
