"""Loss functions named by `loss` in the config: fn(output, target) -> scalar tensor."""
import torch.nn.functional as F


def nll_loss(output, target):
    """Negative log-likelihood of log-probabilities (the models here end in log_softmax)."""
    return F.nll_loss(output, target)


def cross_entropy(output, target):
    """Cross-entropy of raw logits."""
    return F.cross_entropy(output, target)
