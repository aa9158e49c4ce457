"""torch.distributed helpers. Under torchrun there is one process per device; without it every
helper here is a cheap no-op, so single-process code paths stay plain."""
import gc
import itertools
import os

import torch
import torch.distributed as dist


def init_distributed(use_cuda: bool):
    """Join the process group torchrun set up (NCCL on GPUs, gloo on the CPU): the device to use;
    None when not launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def any_process(flag: bool, device) -> bool:
    """True on every process if `flag` is true on any (a collective: every process must call it)."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device)).item()) if is_distributed() else flag


def broadcast_buffers(module, with_parameters=False) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics), and parameters, in `module` on every process."""
    tensors = itertools.chain(module.buffers(), module.parameters() if with_parameters else ())
    for tensor in tensors if is_distributed() else ():
        dist.broadcast(tensor.detach(), src=0)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    out = [obj] * world_size()
    if is_distributed():
        dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_distributed():
        # Free a DDP model left in a reference cycle now: freed at interpreter exit, after the process
        # group, its gloo work objects can abort the process (SIGABRT) although training succeeded.
        gc.collect()
        dist.destroy_process_group()
