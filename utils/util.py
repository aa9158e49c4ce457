"""Small helpers with side effects, kept in one place: files, RNG state, devices."""
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, write) -> None:
    """Write through `write(fileobj)` to a temp file beside `path`, fsync, then rename into place.

    A crash at any instant leaves either the old file or the complete new one under `path`,
    never a partial file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_json(content, path) -> None:
    atomic_write_text(json.dumps(content, indent=2) + "\n", path)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Called once, by main()."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Every global RNG state as plain data (tensors, ints, strings), so weights_only loading works."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        # only this process's GPU: another machine may see a different number of them
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DataParallel / DistributedDataParallel / torch.compile wrappers.

    Checkpoints always hold this module's state_dict, so their keys never carry
    'module.' or '_orig_mod.' prefixes.
    """
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def prepare_device(n_gpu_use: int, logger) -> torch.device:
    """The device for a single process: the first visible GPU if n_gpu_use > 0 and one exists, else the CPU."""
    if n_gpu_use > 0 and not torch.cuda.is_available():
        logger.info("n_gpu=%d in the config, but no GPU is available: running on the CPU.", n_gpu_use)
        return torch.device("cpu")
    return torch.device("cuda:0" if n_gpu_use > 0 else "cpu")
