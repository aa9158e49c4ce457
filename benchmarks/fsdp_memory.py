"""What trainer.strategy "fsdp" saves and costs against "ddp": 2 processes (gloo, CPU), one model of ~50M parameters.

    python benchmarks/fsdp_memory.py [--steps 5] [--width 2900] [--layers 6]

Each process builds the same model (a stack of Linear(width, width) + ReLU blocks), wraps it as train.py does
(DistributedDataParallel, or utils.sharding.shard: fully_shard per block), and takes optimizer steps with Adam on
random batches of 8. Printed per strategy, for rank 0: the bytes of the tensors this process holds for training,
counted from the tensors themselves (parameters, gradients, Adam's exp_avg / exp_avg_sq / step; a DTensor by its
local shard), not the process's resident memory; and the median seconds per step after one untimed step.
"""
import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def held_bytes(model, optimizer):
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
               *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))]
    return sum(getattr(t, "_local_tensor", t).nbytes for t in tensors)  # a DTensor: this process's shard


def measure(rank, port, args, queue):
    from torch.nn.parallel import DistributedDataParallel

    from utils.sharding import shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for strategy in ("ddp", "fsdp"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.ReLU())
                                          for _ in range(args.layers)))
            if strategy == "fsdp":
                shard(model, {"fsdp_modules": None, "amp": None, "activation_checkpointing": False},
                      torch.device("cpu"))
            else:
                model = DistributedDataParallel(model)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            times = []
            for _ in range(args.steps + 1):
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: counted below
                model(torch.randn(8, args.width)).square().mean().backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
            n_params = sum(p.numel() for p in model.parameters())  # a DTensor counts its whole size
            queue.put((rank, strategy, n_params, held_bytes(model, optimizer), statistics.median(times[1:])))
            del model, optimizer
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--width", type=int, default=2900)
    p.add_argument("--layers", type=int, default=6)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=measure, args=(r, port, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=1800) for _ in range(4)]
    for proc in procs:
        proc.join()
    rows = {strategy: (n, held, seconds) for rank, strategy, n, held, seconds in results if rank == 0}
    for strategy, (n, held, seconds) in rows.items():
        print(f"{strategy}: {n / 1e6:.1f}M parameters; rank 0 holds {held / 2**20:.0f} MiB of parameters, gradients "
              f"and Adam state; {seconds:.3f} s per step")
    (_, ddp_bytes, ddp_s), (_, fsdp_bytes, fsdp_s) = rows["ddp"], rows["fsdp"]
    print(f"fsdp/ddp: memory {fsdp_bytes / ddp_bytes:.3f}x, time per step {fsdp_s / ddp_s:.2f}x "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
