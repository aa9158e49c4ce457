"""Small helpers with side effects, kept in one place: files, RNG state, devices, batches."""
import contextlib
import fcntl
import itertools
import json
import logging
import os
import random
import secrets
from pathlib import Path

import numpy as np
import torch


def atomic_write_bytes(data: bytes, path) -> None:
    """Write to a temp file beside `path`, fsync, rename into place, fsync the directory: a crash at
    any instant leaves the old file or the complete new one under `path`, never a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # beside it: the rename stays on one disk
    try:
        # "x" creates it with the permissions the umask gives, as any output (mkstemp's would be private,
        # 0600): a save_dir shared by a team stays readable to it
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # name the file being written, not the temp file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside loads with weights_only=True (no code runs from a file), also where a library asks
    for False: torch.hub's weights loader does, torch.export.load retries a refused pickle with it."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")  # torch refuses both set at once
    saved = {key: os.environ.pop(key) for key in keys if key in os.environ}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # torch.load reads it at each call
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update(saved)


def atomic_link(source: Path, path: Path) -> bool:
    """Make `path` a second name of the complete file `source` (no second copy of its bytes), replacing
    `path` atomically; False where the file system has no hard links."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    _replace(tmp, path)
    return True


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory) -> None:
    """A rename is durable once the directory entry is on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claim_dir(path: Path, numbered=True) -> Path:
    """Create `path` (or, if it exists and `numbered`, <path>_1, <path>_2, ...) exclusively, with any missing
    parents; the one created."""
    for n in itertools.count():
        candidate = path.with_name(f"{path.name}_{n}") if n else path
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if not numbered:
                raise


def lock_dir(directory: Path):
    """(file, None) holding an exclusive lock on `directory` until the file is closed (or the process
    ends, however it ends), or (None, pid of the holder) when another process holds it."""
    lock = open(Path(directory) / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with lock:
            lock.seek(0)
            return None, lock.read().strip()[:20]
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)
    return lock, None


def atomic_write_text(text: str, path) -> None:
    atomic_write_bytes(text.encode(), path)


def write_json(content, path) -> None:
    atomic_write_text(json.dumps(content, indent=2) + "\n", path)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Called once, by main()."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Every global RNG state as plain data (tensors, ints, strings), so weights_only loading works."""
    name, keys, *rest = np.random.get_state()
    # only this process's GPU: another machine may see a different number of them
    cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest),
            "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / torch.compile wrappers, whose state_dict checkpoints hold (no key prefixes)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    while isinstance(model, ddp) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, ddp) else model._orig_mod
    return model


def prepare_device(n_gpu_use: int, logger=None) -> torch.device:
    """The device for a single process: the first visible GPU if n_gpu_use > 0 and one exists, else the CPU."""
    if n_gpu_use > 0 and not torch.cuda.is_available():
        (logger or logging.getLogger("train")).warning("n_gpu is %d in the config, but no GPU is available: "
                                                       "running on the CPU.", n_gpu_use)
    return torch.device("cuda:0" if n_gpu_use > 0 and torch.cuda.is_available() else "cpu")


def tree_map(fn, batch):
    """`fn` applied to every tensor of a batch: a tensor, or a tuple, list or dict of them (nested)."""
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: tree_map(fn, v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(tree_map(fn, v) for v in batch)
    return batch


def to_device(batch, device):
    """A batch (a tensor, or a nested tuple, list or dict of them) on `device`."""
    return tree_map(lambda t: t.to(device, non_blocking=True), batch)
