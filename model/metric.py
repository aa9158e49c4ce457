"""Metrics named in `metrics` in the config: fn(output, target) -> scalar tensor, a batch mean.

They return tensors, not floats, so the Trainer can sum them on the device without a host
sync every step. The Trainer weights each batch's value by its size.
"""
import torch


def accuracy(output, target):
    """Fraction of samples whose arg-max class is the target."""
    with torch.no_grad():
        return (output.argmax(dim=1) == target).float().mean()


def top_k_acc(output, target, k=3):
    """Fraction of samples whose target is among the k highest-scored classes."""
    with torch.no_grad():
        top = output.topk(k, dim=1).indices
        return (top == target.unsqueeze(1)).any(dim=1).float().mean()
