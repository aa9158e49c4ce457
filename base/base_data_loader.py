"""The template's data path: the datasets a config names, split, transformed and batched in an order that
is a pure function of (seed, epoch), so resuming needs only the epoch and the number of batches taken."""
import atexit
import hashlib
import itertools
import json
import math
import os
import signal
import weakref

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import utils.dist as dist
from utils.errors import ConfigError, DataError


class Transformed(Dataset):
    """`dataset` with `transform` applied to each sample. With a `seed` (training) it is indexed by (epoch, index),
    which seeds the transform's torch randomness: the same in a worker or the main process, resumed or not.
    `input_only`: the transform is torchvision's, which passes plain labels through untouched, so an
    (input, label, ...) sample whose other items are not images, boxes or masks gives the same result when
    only its input is transformed, without the per-transform cost of walking the whole sample."""

    def __init__(self, dataset, transform, seed=None, input_only=False):
        self.dataset, self.transform, self.seed, self.input_only = dataset, transform, seed, input_only

    def _apply(self, sample):
        if self.input_only and isinstance(sample, tuple) and len(sample) > 1 and \
                not any(_is_visual(item) for item in sample[1:]):
            return (self.transform(sample[0]), *sample[1:])
        return self.transform(sample)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        """Samples of a batch of keys (torch's DataLoader fetches a batch through this): the RNG stream is
        set aside once per batch, and each sample seeded, at about a microsecond per sample."""
        if self.seed is None:
            return [self._apply(self.dataset[key]) for key in keys]
        samples, generator = [], torch.random.default_generator
        with torch.random.fork_rng(devices=[]):  # the process's own RNG stream is left as it was
            for epoch, index in keys:
                generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**63)
                samples.append(self._apply(self.dataset[index]))
        return samples


def _is_visual(item) -> bool:
    """What torchvision's transforms would transform with the input: a tv_tensor (image, boxes, mask...), a PIL
    image, a tensor of 2 or more dimensions (with no image in the sample, its first plain tensor is one)."""
    from torchvision import tv_tensors
    return isinstance(item, tv_tensors.TVTensor) or type(item).__module__.startswith("PIL.") or \
        (torch.is_tensor(item) and item.dim() >= 2)


def split_indices(n, fractions, seed):
    """Disjoint random index sets of the given fractions of n, then the rest; fixed by `seed`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [int(round(n * f)) for f in fractions]
    if sum(sizes) > n:
        raise ConfigError(f"data_loader: validation_split + test_split leave no training samples (of {n})")
    return [part.sort().values for part in order.split([*sizes, n - sum(sizes)])]


def make_datasets(config) -> dict:
    """{"train", "valid", "test": Dataset or None}: each the dataset the config names for it, else a seeded
    fraction of `dataset`; training samples get train_transform (seeded per sample), the others eval_transform."""
    cfg = config["data_loader"]
    sets = {"train": None, "valid": None, "test": None}
    for phase in ("valid", "test"):
        spec = cfg[f"{phase}_dataset"]
        try:
            sets[phase] = config.init_obj(f"data_loader.{phase}_dataset") if spec else None
        except DataError:  # e.g. an ImageFolder whose directory is absent
            if not spec.get("optional"):
                raise
    data = config.init_obj("data_loader.dataset")
    fractions = [0.0 if sets["valid"] is not None else cfg["validation_split"],
                 0.0 if sets["test"] is not None else cfg["test_split"]]
    for phase, idx in zip(("valid", "test", "train"), split_indices(len(data), fractions, config["seed"])):
        if sets[phase] is None and isinstance(data, TensorDataset):  # stays one: the tensor-indexing fast path
            sets[phase] = TensorDataset(*(t[idx] for t in data.tensors))
            sets[phase].indices = idx.tolist()  # which samples of `dataset` it holds, as a Subset's
        elif sets[phase] is None:
            sets[phase] = Subset(data, idx.tolist())
    for phase, key in (("train", "train_transform"), ("valid", "eval_transform"), ("test", "eval_transform")):
        transform, input_only = make_transform(config, key)
        if transform is not None:  # each transform gets the whole sample; torchvision's pass labels through
            sets[phase] = Transformed(sets[phase], transform, config["seed"] if phase == "train" else None, input_only)
    return {phase: ds if len(ds) else None for phase, ds in sets.items()}


def describe(sets) -> dict:
    """What a checkpoint records of its data (checkpoint["data"]): each split's fingerprint(), and the inputs'
    shape and dtype and the class names of the first split there is, so predict.py and export.py need no data."""
    first = next(sets[k] for k in ("valid", "test", "train") if sets[k] is not None)
    sample = first[(0, 0)] if isinstance(first, Transformed) and first.seed is not None else first[0]
    x = sample[0] if isinstance(sample, (tuple, list)) else None  # the inputs of an (inputs, target) sample
    classes = getattr(source_of(first)[1], "classes", None)  # torchvision's datasets have them
    return {"splits": {phase: fingerprint(ds) for phase, ds in sets.items()},
            "input": {"shape": [None, *x.shape], "dtype": str(x.dtype)} if torch.is_tensor(x) else None,
            "class_names": list(map(str, classes)) if classes is not None else None}


def source_of(dataset):
    """(indices into it, the dataset a split was cut from), through Transformed, Subset and split tensors."""
    index, source = list(range(len(dataset))), dataset
    while isinstance(source, Transformed) or hasattr(source, "indices"):  # a Subset, or a split of tensors
        index = [int(source.indices[i]) for i in index] if hasattr(source, "indices") else index
        source = getattr(source, "dataset", None)  # None: a split of tensors, a copy of its part
    return index, source


def fingerprint(dataset):
    """'<n> samples, <digest>': which samples a split holds, by the indices it took of its dataset and, where
    that dataset lists its files (ImageFolder's samples), their paths under its root and their labels."""
    if dataset is None:
        return None
    index, source = source_of(dataset)
    samples, root = getattr(source, "samples", None), str(getattr(source, "root", ""))
    if isinstance(samples, list):  # (path, label) pairs
        index = [f"{str(samples[i][0]).removeprefix(root)}:{samples[i][1]}" for i in index]
    return f"{len(dataset)} samples, {hashlib.sha256(json.dumps(index).encode()).hexdigest()[:16]}"


def make_transform(config, key):
    """(the Compose of data_loader.<key>, whether every transform in it is torchvision's), or (None, False)."""
    specs = config["data_loader"][key]
    if not specs:
        return None, False
    from torchvision.transforms.v2 import Compose, Transform  # slow to import: only when needed
    transforms = [config.init_obj(f"data_loader.{key}.{i}") for i in range(len(specs))]
    return Compose(transforms), all(isinstance(t, Transform) for t in transforms)


def auto_workers(dataset) -> int:
    """num_workers "auto": none for in-memory tensors (batched by indexing, faster than any worker), else
    one per CPU this process may use, sharing them with the other processes of this machine under torchrun."""
    if isinstance(dataset, TensorDataset):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def make_loader(config, dataset, training=False, device=None):
    """The BaseDataLoader of a split from make_datasets() (None for None): training's shuffles, per config;
    batches bound for `device` (pinned, or in-memory tensors moved there once, on a CUDA device)."""
    cfg = config["data_loader"]
    if dataset is None:
        return None
    workers = auto_workers(dataset) if cfg["num_workers"] == "auto" else cfg["num_workers"]
    even = training or config["trainer"]["strategy"] == "fsdp"  # fsdp evaluates in step too: a forward is a collective
    return BaseDataLoader(dataset, cfg["batch_size"], cfg["shuffle"] and training, workers, config["seed"],
                          even_shards=even, prefetch_factor=cfg["prefetch_factor"], device=device)


class EpochBatchSampler:
    """Index batches for one epoch: a seeded permutation (or 0..n-1), cut into batches. Under DDP each rank
    takes every world_size-th index of the shared order, as torch's DistributedSampler does. With even_shards
    the order is first padded by repeating its start, so every rank has as many batches (training needs that:
    each step is a collective); evaluation leaves it off and counts every sample once."""

    def __init__(self, n, batch_size, shuffle, seed=0, rank=0, world_size=1, even_shards=True):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.padded_n = -(-n // world_size) * world_size if even_shards else n
        self.epoch, self.start_batch = 0, 0  # start_batch: batches of this epoch already done (resuming mid-epoch)
        self.keyed = False  # yield (epoch, index) keys, for a dataset that seeds per-sample randomness

    def indices(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)) \
            if self.shuffle else torch.arange(self.n)
        if self.padded_n > self.n:
            order = torch.cat([order, order[:self.padded_n - self.n]])
        return order[self.rank::self.world_size]

    def n_real(self, batch):
        """Samples of local batch `batch` that are not padding (padding comes last); None if none pads."""
        if self.padded_n == self.n:
            return None
        return max(0, min(self.batch_size, len(range(self.rank, self.n, self.world_size)) - batch * self.batch_size))

    def __len__(self):
        return math.ceil(len(range(self.rank, self.padded_n, self.world_size)) / self.batch_size)

    def __iter__(self):
        indices = self.indices()
        batches = indices.split(self.batch_size)[self.start_batch:] if len(indices) else ()
        # Not reset here: torch's DataLoader may call iter() on its sampler twice per pass.
        return iter([[(self.epoch, i) for i in b.tolist()] for b in batches] if self.keyed else batches)


_LIVE = weakref.WeakSet()  # loaders whose workers may be running


@atexit.register  # registered after multiprocessing's exit handler, so it runs before it
def _close_loaders():
    """Stop live workers at interpreter exit: they ignore SIGTERM, which multiprocessing's own exit
    handler would send them, then wait forever (a loader kept in a global, a notebook, a script)."""
    for loader in list(_LIVE):
        loader.close()


def _ignore_stop_signals(worker_id):
    """In DataLoader workers: leave SIGINT / SIGTERM to the main process, which finishes the step and saves;
    a scheduler or Ctrl-C signalling the whole process group must not kill the workers first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BaseDataLoader:
    """Iterates batches of `dataset` in the order of an EpochBatchSampler (each process its own shard under
    torchrun; `even_shards=False` for evaluation). A TensorDataset with 0 workers is batched by tensor
    indexing; any other dataset goes through torch's DataLoader with `num_workers` worker processes."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                 seed: int = 0, even_shards: bool = True, prefetch_factor: int = 4, device=None):
        self.dataset, self.num_workers = dataset, num_workers
        self.sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, rank=dist.rank(),
                                         world_size=dist.world_size(), even_shards=even_shards)
        self.sampler.keyed = isinstance(dataset, Transformed) and dataset.seed is not None
        # Pinned host memory only pays off when the batches are copied to a CUDA device.
        self.pin_memory = device is not None and torch.device(device).type == "cuda"
        self.tensors, self._loader = None, None
        if isinstance(dataset, TensorDataset) and num_workers == 0:
            self.tensors = dataset.tensors
            if self.pin_memory and sum(t.nbytes for t in self.tensors) <= torch.cuda.mem_get_info(device)[0] // 4:
                # on the GPU once (leaving 3/4 of its free memory to training): batches are then indexed there
                self.tensors, self.pin_memory = [t.to(device) for t in self.tensors], False
        else:
            # Its own generator: worker seeds must not draw from (and so shift) the global RNG,
            # or a resumed run would see different dropout masks than an uninterrupted one.
            self._loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                      pin_memory=self.pin_memory, persistent_workers=num_workers > 0,
                                      prefetch_factor=prefetch_factor if num_workers > 0 else None,
                                      generator=torch.Generator().manual_seed(seed),
                                      worker_init_fn=_ignore_stop_signals)
            _LIVE.add(self)

    def close(self) -> None:
        """Stop the worker processes now (persistent ones otherwise live as long as this loader)."""
        iterator = getattr(self._loader, "_iterator", None)  # where torch keeps persistent workers
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use `epoch`'s order on the next pass, beginning after its first `start_batch` batches."""
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch

    def __len__(self):
        return len(self.sampler)

    def stream(self, start):
        """(batch, samples in it that are not DDP padding) from global batch number `start` on, pass after
        pass over the data. Pass p uses epoch p's order, so where a batch comes from depends only on its
        number: an iteration-based epoch can end mid-pass."""
        passes, position = divmod(start, len(self))
        for p in itertools.count(passes):
            self.set_epoch(p, start_batch=position)
            for position, batch in enumerate(self, start=position):
                yield batch, self.sampler.n_real(position)
            position = 0

    def __iter__(self):
        return iter(self._loader) if self._loader is not None else self._iter_tensors()

    def _iter_tensors(self):
        for idx in self.sampler:
            batch = tuple(t[idx.to(t.device)] for t in self.tensors)
            yield tuple(t.pin_memory() for t in batch) if self.pin_memory else batch
