"""Dataset-level metrics: accumulate per batch, compute once per epoch. A Metric's state is one tensor of
sums (`self.sums`), which add up over batches and processes: the result does not depend on the batch size,
the engine can all_reduce them under torchrun, a mid-epoch checkpoint can store them. update() stays on the device."""
import re

import torch

import utils.dist as dist
from utils.util import tree_map


class Metric:
    """Subclass and implement batch_sums(output, target) -> tensor and compute_from(sums) -> float."""

    sums = None  # until the first update()

    def reset(self):
        self.sums = None

    def update(self, output, target):
        batch = self.batch_sums(output, target)
        self.sums = batch if self.sums is None else self.sums + batch

    def compute(self):
        return float(self.compute_from(self.sums)) if self.sums is not None else float("nan")


class BatchMean(Metric):
    """A function (output, target) -> batch-mean tensor, weighted by the batch size."""

    def __init__(self, fn):
        self.fn, self.total, self.count = fn, None, 0

    def update(self, output, target):
        # A running weighted sum on the device and a Python count: no host sync, few ops a batch.
        value, n = torch.as_tensor(self.fn(output, target)).detach().float(), batch_size(target)
        self.total = value * n if self.total is None else self.total.add_(value, alpha=n)
        self.count += n

    def _get_sums(self):  # float64: exact counts beyond 2**24 samples
        return None if self.total is None else torch.stack([self.total.double(), self.total.new_tensor(
            self.count, dtype=torch.float64)])

    def _set_sums(self, sums):  # back to float32, the dtype an uninterrupted run accumulates in
        self.total, self.count = (None, 0) if sums is None else (sums[0].float(), int(sums[1].item()))

    sums = property(_get_sums, _set_sums)  # the Metric's sums, made from the running total and count

    def compute_from(self, sums):
        return sums[0] / sums[1]


def snake_case(name: str) -> str:
    """MacroF1 -> macro_f1, TopKAccuracy -> top_k_accuracy; snake_case names stay as they are."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class MetricTracker:
    """The loss and the metrics of one phase (training or validation): update per batch, compute per epoch.
    Objects with update/compute/reset that are not Metrics (e.g. torchmetrics) work too; they sync themselves."""

    def __init__(self, metrics: dict):
        self.metrics = {"loss": BatchMean(lambda loss, target: loss), **metrics}

    def reset(self):
        for m in self.metrics.values():
            m.reset()

    def update(self, loss, output, target, n_real=None):
        if n_real == 0:  # a batch of DDP padding only
            return
        if n_real is not None:  # drop the samples that pad the last DDP shard
            output, target = (tree_map(lambda t: t[:n_real], x) for x in (output, target))
        with torch.no_grad():
            output = output.detach() if torch.is_tensor(output) else output
            for name, m in self.metrics.items():
                m.update(loss.detach() if name == "loss" else output, target)

    def compute(self, device) -> dict:
        """Every value; under torchrun over the samples of all processes (one collective)."""
        own = [m for m in self.metrics.values() if isinstance(m, Metric)]
        if dist.is_distributed() and own:
            # A process that saw no batch contributes zeros, shaped like the others' sums.
            every = dist.gather_objects([None if m.sums is None else tuple(m.sums.shape) for m in own])
            shapes = [next((s[i] for s in every if s[i] is not None), ()) for i in range(len(own))]
            parts = [torch.zeros(shape, device=device) if m.sums is None else m.sums for m, shape in zip(own, shapes)]
            flat = dist.all_reduce(torch.cat([part.to(device, torch.float64).flatten() for part in parts]))
            for m, mine, summed in zip(own, parts, flat.split([part.numel() for part in parts])):
                m.sums = summed.view(mine.shape)
        return {name: float(m.compute()) for name, m in self.metrics.items()}

    def state_dict(self) -> dict:
        # on the CPU; a metric without a batch yet keeps None
        return {name: tree_map(torch.Tensor.cpu, m.sums) for name, m in self.metrics.items() if isinstance(m, Metric)}

    def load_state_dict(self, state: dict, device) -> None:
        for name, sums in state.items():
            self.metrics[name].sums = sums.to(device) if sums is not None else None


def batch_size(x) -> int:
    """Samples in a batch: the length of its first tensor (of a tuple, list or dict batch)."""
    if torch.is_tensor(x):
        return x.shape[0] if x.dim() else 1
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    return next((batch_size(v) for v in values if batch_size(v)), 0)


def metric_object(metric):
    """An object with update/compute/reset as it is; a function (output, target) -> batch mean in a BatchMean."""
    return metric if all(hasattr(metric, a) for a in ("update", "compute", "reset")) else BatchMean(metric)
