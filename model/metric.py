"""Metrics named in `metrics` in the config. A function (output, target) -> tensor is a batch mean, weighted
by the batch size (exact for per-sample means). A metric that is not one (F1, AUC) subclasses Metric:
batch_sums() returns sums that add up over batches, compute_from() turns the epoch's sums into the value."""
import torch

from base.base_metric import Metric


def accuracy(output, target):
    """Fraction of samples whose arg-max class is the target."""
    return (output.argmax(dim=1) == target).float().mean()


def top_k_acc(output, target, k=3):
    """Fraction of samples whose target is among the k highest-scored classes."""
    top = output.topk(k, dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).float().mean()


class MacroF1(Metric):
    """F1 of each class, averaged over the classes, from the epoch's confusion matrix."""

    def batch_sums(self, output, target):
        n_classes = output.shape[1]
        cells = target * n_classes + output.argmax(dim=1)  # row: true class, column: predicted
        # index_add_, not bincount: bincount's output size would need a host sync
        return torch.zeros(n_classes * n_classes, device=output.device).index_add_(
            0, cells, torch.ones_like(cells, dtype=torch.float)).view(n_classes, n_classes)

    def compute_from(self, sums):
        cm = sums.view(-1).view(round(sums.numel() ** 0.5), -1).double()
        support = cm.sum(0) + cm.sum(1)  # a class counts if it is a target or a prediction
        f1 = 2 * cm.diag() / support.clamp_min(1)
        return f1[support > 0].mean()
