"""Checkpoint files: find, load safely, check against a model, serialize. A checkpoint is plain data (tensors,
numbers, strings, lists, dicts), so it loads with torch.load(weights_only=True), which never runs code from the file."""
import io
import pickle
import re
import zipfile
from datetime import datetime
from pathlib import Path

import torch

from utils import sharding
from utils.config_file import check_size, check_type, is_name
from utils.errors import CheckpointError, ConfigError, DataError
from utils.util import atomic_link, atomic_write_bytes, claim_dir

CHECKPOINT_KEYS = {"arch", "epoch", "run_id", "model", "optimizer", "lr_scheduler", "trainer", "scaler", "metrics",
                   "rng", "config", "callbacks", "data"}
# checkpoint["trainer"], BaseTrainer's counters: finished epochs, steps, batches of epoch + 1 done (mid-epoch), best,
# early-stop count
TRAINER_KEYS = ("epoch", "global_step", "batches_done", "monitor_best", "best_epoch", "not_improved_count")
_NAME = re.compile(r"checkpoint-epoch(\d+)(?:-step(\d+))?\.pth$")


def _position(path: Path):
    m = _NAME.match(path.name)  # a finished epoch N comes after every step inside epoch N
    return (int(m.group(1)), 1 if m.group(2) is None else 0, int(m.group(2) or 0))


def position_of(checkpoint: dict):
    """Where in training a loaded checkpoint stands, comparable with the file names' positions."""
    mid_epoch = checkpoint["trainer"].get("batches_done")
    return (checkpoint["epoch"], 0, checkpoint["trainer"]["global_step"]) if mid_epoch else (checkpoint["epoch"], 1, 0)


def supersede_after(run_dir, resumed: Path, position) -> list:
    """Move the run's checkpoints at or after `position`, but the `resumed` file, into a new
    <run_dir>/superseded/<time>/: a run resumed from an earlier point must not later resume (or prune) onto
    the future it abandoned, and a second such resume must not overwrite what the first one set aside."""
    later = [p for p in list_checkpoints(run_dir) if _position(p) >= position and p.resolve() != resumed.resolve()]
    folder = claim_dir(Path(run_dir) / "superseded" / datetime.now().strftime("%Y%m%d_%H%M%S")) if later else None
    return [path.replace(folder / path.name) for path in later]  # the paths they now have


def list_checkpoints(run_dir) -> list:
    """The run's checkpoint files, oldest position first (model_best.pth excluded)."""
    return sorted((p for p in Path(run_dir).glob("checkpoint-epoch*.pth") if _NAME.match(p.name)), key=_position)


def find_checkpoint(path) -> Path:
    """`path` itself if it is a checkpoint (a file, or an fsdp run's folder); for a run directory, its newest one."""
    path = Path(path)
    if not (path.is_dir() or path.is_file()):
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    found = list_checkpoints(path) if path.is_dir() and not sharding.is_folder(path) else [path]
    if not found:
        raise CheckpointError(f"{path}: no checkpoint-epoch*.pth in this directory")
    return found[-1]


def latest_checkpoint(runs_dir, run_id=None, usable_by=1):
    """(path, checkpoint) of the newest checkpoint of run `run_id`, or of the run most recently saved to,
    under `runs_dir` (<save_dir>/models/<name>), that loads and that `usable_by` processes can resume
    (a mid-epoch one needs as many as saved it); (None, None) when there is none."""
    dirs = [Path(runs_dir) / run_id] if run_id else [d for d in Path(runs_dir).glob("*") if d.is_dir()]
    newest = max((p for d in dirs for p in list_checkpoints(d)), key=lambda p: p.stat().st_mtime_ns, default=None)
    for path in reversed(list_checkpoints(newest.parent) if newest else []):  # the run most recently saved to
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError:
            continue  # unreadable: fall back to the one before
        if not checkpoint["trainer"]["batches_done"] or len(checkpoint["metrics"]) == usable_by:
            return path, checkpoint
    return None, None


def load_checkpoint(path) -> dict:
    """Load a checkpoint onto the CPU, weights_only (of an fsdp run's folder: state.pth, and for "model" the shapes and
    dtypes of its shards, as meta tensors). Every way a file can be unfit is one CheckpointError."""
    path = find_checkpoint(path)
    folder = sharding.is_folder(path)
    file = path / sharding.STATE if folder else path
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"{file}: not a checkpoint (not a torch.save archive; truncated or corrupt?)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        if folder and isinstance(checkpoint, dict):
            checkpoint["model"] = sharding.model_shapes(path)
    except pickle.UnpicklingError as e:
        # torch names the refused object on a line of its own, e.g. "unsupported GLOBAL posix.system ..."
        what = next((line for line in str(e).splitlines() if "GLOBAL" in line), "").strip()
        raise CheckpointError(f"{path}: refused to load: it holds objects that could run code ({what[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, KeyError, IndexError,
            zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first}") from None
    if missing := sorted(CHECKPOINT_KEYS - set(checkpoint if isinstance(checkpoint, dict) else ())):
        raise CheckpointError(f"{path}: not a checkpoint of this template (missing {', '.join(missing)})")
    if fault := _structure_fault(checkpoint):
        raise CheckpointError(f"{path}: malformed checkpoint: {fault}")
    return checkpoint


def _structure_fault(c) -> str:
    """What is wrong with a loaded checkpoint's structure ("" if nothing), checked before any of it is
    used: a file that loads with weights_only can still hold any plain data. Checked in order, each
    check relying on the ones before it."""
    def count(v):
        return type(v) is int and 0 <= v < 2**62
    try:  # first: the lookup below needs a mapping, and what later code walks stays small
        check_type(c["config"], dict, "config")
        check_size(c["config"], "config")
    except ConfigError:
        return "config is not a mapping of at most 100000 values"
    t, runs, saved = c["trainer"], c["rng"], c["config"].get("trainer")  # saved: the run's trainer settings
    keys = set(TRAINER_KEYS)
    epochs = saved["epochs"] if isinstance(saved, dict) and count(saved.get("epochs")) else 2**62
    checks = [
        ("run_id is not a run name", lambda: is_name(c["run_id"])),
        (f"trainer must hold exactly {sorted(keys)}", lambda: isinstance(t, dict) and set(t) == keys),
        ("trainer counters must be integers >= 0", lambda: all(count(t[k]) for k in keys - {"monitor_best"})),
        ("trainer.monitor_best is not a number", lambda: type(t["monitor_best"]) in (int, float)),
        ("epoch does not match trainer.epoch", lambda: c["epoch"] == t["epoch"] + (1 if t["batches_done"] else 0)),
        ("trainer.epoch is past the run's trainer.epochs", lambda: t["epoch"] <= epochs),
        ("model is not a state_dict of tensors", lambda: _mapping(c["model"])),
        ("callbacks is not a {name: state} mapping", lambda: _mapping(c["callbacks"], lambda v: isinstance(v, dict))),
        ("data is not a record of the run's data", lambda: isinstance(c["data"], dict) and set(c["data"]) == {
            "splits", "input", "class_names"} and _mapping(c["data"]["splits"], lambda v: v is None or str(v) == v)),
        # the optimizer's, scheduler's, scaler's and RNG states are checked by loading them (load_state_dict)
        ("rng is not a list of per-process RNG states", lambda: isinstance(runs, list) and len(runs) > 0),
        ("metrics must be null at an epoch's end, else one {name: sums} per process", lambda: c["metrics"] is None
         if not t["batches_done"] else isinstance(c["metrics"], list) and len(c["metrics"]) == len(runs)
         and all(_mapping(m, lambda v: v is None or torch.is_tensor(v)) for m in c["metrics"])),
    ]
    return next((fault for fault, ok in checks if not ok()), "")


def _mapping(value, fits=torch.is_tensor) -> bool:
    """Whether `value` is a dict of string keys to tensors (or to values that `fits`), as a state_dict is."""
    return isinstance(value, dict) and all(isinstance(k, str) and fits(v) for k, v in value.items())


def check_data(checkpoint, path, splits: dict, phases, hint) -> None:
    """DataError unless each split of `phases` holds the samples it held when `checkpoint` was saved."""
    for phase in phases:
        saved = checkpoint["data"]["splits"].get(phase)
        if splits[phase] != saved:
            raise DataError(f"data_loader: the {phase} split is not the data of {path} (then: {saved}; now: "
                            f"{splits[phase]}): files added, removed or renamed, or the split changed; {hint}")


def check_resumable(checkpoint, path, has_scheduler: bool, world_size: int, data=None) -> None:
    """CheckpointError / ConfigError / DataError unless this run (its scheduler, its number of processes, its data:
    describe()'s record) can resume it."""
    if data is not None:
        check_data(checkpoint, path, data["splits"], ("train", "valid"), "to train on new data, start a new run "
                   "from the checkpoint: -c CONFIG -r CHECKPOINT")
    if (checkpoint["lr_scheduler"] is None) == has_scheduler:
        raise ConfigError(f"{path}: lr_scheduler differs from the one the checkpoint was trained with")
    if checkpoint["trainer"]["batches_done"] and len(checkpoint["rng"]) != world_size:
        raise CheckpointError(f"{path}: saved by {len(checkpoint['rng'])} process(es) mid-epoch; resume with as many")


def is_rolling(checkpoint, path) -> bool:
    """Whether `path` is a rolling checkpoint: an epoch's that no rule of its run (save_period, last epoch) kept."""
    saved, epoch = checkpoint["config"]["trainer"], checkpoint["trainer"]["epoch"]
    return Path(path).name == f"checkpoint-epoch{epoch}.pth" and bool(epoch % saved["save_period"]) and \
        epoch != saved["epochs"] and not checkpoint["trainer"]["batches_done"]


def model_weights(checkpoint, path, weights="model") -> dict:
    """The checkpoint's model state_dict ("model"), or the "weights" that the callback named `weights` saved."""
    state = checkpoint["model"] if weights == "model" else checkpoint["callbacks"].get(weights, {}).get("weights")
    if not _mapping(state):
        have = ["model", *(n for n, s in checkpoint["callbacks"].items() if _mapping(s.get("weights")))]
        raise CheckpointError(f"{path}: no weights {weights[:80]!r} in this checkpoint; it has: {', '.join(have)}")
    return state


def load_model_state(model, state, path, arch) -> None:
    """Load a state_dict of weights (of a folder `path`: its shards) into `model`, strictly, or explain a mismatch."""
    own = model.state_dict()
    faults = {"missing keys": sorted(set(own) - set(state)), "unexpected keys": sorted(set(state) - set(own)),
              "shape mismatches": [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                   for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]}
    if any(faults.values()):
        def some(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "") if keys else "none"
        listed = "; ".join(f"{what}: {some(keys)}" for what, keys in faults.items())
        raise CheckpointError(f"{path}: weights of arch {arch!r} do not fit the model {type(model).__name__}: {listed}")
    if sharding.is_folder(path) and all(t.is_meta for t in state.values()):  # the model's values are in the shards
        return sharding.load(path, model)
    model.load_state_dict(state)


def save_checkpoint(state, run_dir, epoch, step, periodic, best, keep_last, replaces=None, write=True,
                    shards=None) -> Path:
    """Write checkpoint-epoch<N>[-step<S>].pth (periodic) and/or model_best.pth from one serialization, each
    replaced atomically (model_best.pth as a second name of the periodic file, where the file system can);
    `replaces` (a rolling checkpoint) and, beyond keep_last, older checkpoints are deleted only after the new
    one is on disk. `shards`: (model, optimizer) of an fsdp run, written by every process into a checkpoint folder.
    Returns the periodic file's path (model_best.pth's if only best)."""
    name = f"checkpoint-epoch{epoch}.pth" if step is None else f"checkpoint-epoch{epoch}-step{step}.pth"
    path, best_path = Path(run_dir) / (name if periodic else "model_best.pth"), Path(run_dir) / "model_best.pth"
    if shards is not None:
        folder = sharding.save_shards(*shards, path)
    if not write:  # under torchrun only rank 0 writes
        return path
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if shards is not None:  # the rest of the state beside the shards, then the folder into place whole
        atomic_write_bytes(buffer.getvalue(), folder / sharding.STATE)
        sharding.rename(folder, path)
    elif periodic:
        atomic_write_bytes(buffer.getvalue(), path)
    if periodic:
        found = list_checkpoints(run_dir)
        for old in [*(found[:-keep_last] if keep_last else []), *([replaces] if replaces not in (None, path) else [])]:
            sharding.remove(old)
    if best and periodic and shards is not None:
        sharding.copy(path, best_path)
    elif best and shards is None and not (periodic and atomic_link(path, best_path)):
        atomic_write_bytes(buffer.getvalue(), best_path)
    return path
