"""trainer.strategy "fsdp": the model sharded over the processes with FSDP2 (fully_shard), and its checkpoints written
with torch.distributed.checkpoint (DCP). Such a checkpoint is a folder named like the file it stands for
(checkpoint-epoch<N>.pth/): each process writes its shards of the model and optimizer, rank 0 the rest of the run
state (state.pth). It is built under a temporary name and renamed into place whole: no name points at part of one."""
import errno
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch

import utils.dist as dist
from utils.errors import CheckpointError, ConfigError
from utils.util import fsync_dir, weights_only_loads

STATE = "state.pth"  # in a checkpoint folder: what state_dict() holds besides the shards
# What DCP's .metadata (a plain pickle) may hold: its own records, torch sizes, dtypes, layouts; nothing that runs code
RECORDS = {"torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                                     "ChunkStorageMetadata", "MetadataIndex", "TensorProperties",
                                                     "StorageMeta", "_MEM_FORMAT_ENCODING"},
           "torch.distributed.checkpoint.filesystem": {"_StorageInfo"}, "torch": {"Size"},
           "torch.serialization": {"_get_layout"}, "pathlib": {"PosixPath"}, "collections": {"OrderedDict"}}


def shard(model, cfg, device):
    """fully_shard each block (the modules of the classes trainer.fsdp_modules names, else the model's children that
    hold parameters), then the model; with trainer.amp parameters compute in bf16 (fp16), gradients reduce in fp32.
    Every process starts from rank 0's weights (DDP does the same), whose shards it keeps."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    names = cfg["fsdp_modules"]
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model] if names else \
        [m for m in model.children() if next(m.parameters(), None) is not None]
    if names and not blocks:
        raise ConfigError(f"trainer.fsdp_modules: the model has no module of class {' or '.join(names)[:200]}")
    dist.broadcast_buffers(model, with_parameters=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    mesh = init_device_mesh(torch.device(device).type, (dist.world_size(),))  # the run's device, not any GPU
    for block in blocks:
        if cfg["activation_checkpointing"]:
            checkpoint(block)  # keeps only the block's input; its activations are recomputed in backward
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def is_folder(path) -> bool:
    """Whether `path` is a checkpoint folder (an fsdp run's), rather than a file or a run directory."""
    return Path(path).is_dir() and (Path(path) / STATE).is_file()


def save_shards(model, optimizer, path) -> Path:
    """Every process writes its shards of `model` and `optimizer` (a collective) into the temporary folder of `path`,
    which it returns; the caller adds the rest of the state (STATE) and renames the folder into place (rename)."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = path.with_name(f".{path.name}.tmp")  # one name on every process; a crash's leftover goes at the next start
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: as intended
        try:
            dcp_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp,
                     no_dist=not dist.is_distributed())
        except CheckpointException as e:  # a BaseException around the processes' errors
            cause = _cause(e)
            if not isinstance(cause, OSError):  # torch.save's file writer reports a full disk as a RuntimeError
                cause = OSError(errno.EIO, f"cannot write the checkpoint's shards ({str(cause).strip()[:200]}; "
                                f"{shutil.disk_usage(path.parent).free // 2**20} MiB free there)", str(tmp))
            raise cause from None
    return tmp


def copy(path: Path, to: Path) -> None:
    """Checkpoint folder `to` (model_best.pth) as a copy of `path`, its files hard links where the file system can."""
    tmp = to.with_name(f".{to.name}.tmp")
    shutil.copytree(path, tmp, copy_function=_link_or_copy)
    fsync_dir(tmp)
    rename(tmp, to)


def _link_or_copy(source, target):
    try:
        os.link(source, target)  # the files of a checkpoint are never changed in place: sharing them is safe
    except OSError:
        shutil.copy2(source, target)


def rename(tmp: Path, path: Path) -> None:
    """Folder `tmp` to `path`; an older `path` (model_best.pth) is first set aside as .<name>.old.tmp: a kill between
    the two renames leaves no `path`, and the next start puts the old one back (restore_or_remove)."""
    old = path.with_name(f".{path.name}.old.tmp")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    remove(old)


def remove(path: Path) -> None:
    """Delete a checkpoint file or folder; a folder is renamed first, so its name goes at once, not file by file."""
    if path.is_dir() and not path.is_symlink():
        gone = path.with_name(f".{path.name}.del.tmp")
        shutil.rmtree(gone, ignore_errors=True)
        path.rename(gone)
        shutil.rmtree(gone)
    else:
        path.unlink(missing_ok=True)


def restore_or_remove(stale: Path) -> None:
    """A .*.tmp a crash left: deleted, but a set-aside checkpoint whose name is free goes back."""
    name = stale.name[1:].removesuffix(".old.tmp")
    if stale.name.endswith(".old.tmp") and not (stale.parent / name).exists():
        stale.rename(stale.parent / name)
    else:
        remove(stale)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in RECORDS.get(module, ()) or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")


def read_metadata(path):
    """DCP's index of checkpoint folder `path`, unpickled with only the classes RECORDS lists (DCP's own reader would
    run whatever a planted .metadata names); its shard files must be in the folder."""
    with open(Path(path) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if any(Path(info.relative_path).name != info.relative_path for info in metadata.storage_data.values()):
        raise ValueError("its .metadata names shard files outside the folder")
    return metadata


def model_shapes(path) -> dict:
    """{key: an empty meta tensor of the saved shape and dtype}: the model of checkpoint folder `path`, without data."""
    saved = read_metadata(path).state_dict_metadata
    return {k.removeprefix("model."): torch.empty(v.size, dtype=v.properties.dtype, device="meta")
            for k, v in saved.items() if k.startswith("model.") and hasattr(v, "size")}


def _cause(e):
    """What DCP's CheckpointException wraps: the first process's own error (e.g. an OSError)."""
    return next(iter(e.failures.values()))[0] if e.failures else RuntimeError(str(e))


def load(path, model, optimizer=None) -> None:
    """The weights of checkpoint folder `path` into `model`, or with `optimizer` its state, sharded or not, on any
    number of processes (DCP reshards); under torchrun every process takes part."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(self.path)
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    key = "model" if optimizer is None else "optimizer"
    state = {key: get_model_state_dict(model) if optimizer is None else get_optimizer_state_dict(model, optimizer)}
    with weights_only_loads(), warnings.catch_warnings():  # DCP unpickles non-tensors with weights_only=False
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        try:
            dcp_load(state, storage_reader=Reader(path), no_dist=not dist.is_distributed())
        except CheckpointException as e:  # a BaseException around each process's error
            cause = _cause(e)
            raise CheckpointError(f"{path}: cannot load its shards ({type(cause).__name__}: {str(cause)[:200]})") \
                from None
    if optimizer is None:
        set_model_state_dict(model, state[key])
    else:
        set_optimizer_state_dict(model, optimizer, state[key])
