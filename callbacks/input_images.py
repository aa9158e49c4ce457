"""A callback that shows what the model is trained on: the first inputs of each epoch, as an image grid."""
import torch


class InputImages:
    """TensorBoard IMAGES `inputs/train`: the first `count` inputs of each epoch's first step, each scaled to
    [0, 1], when the batch's first tensor holds images (N, C, H, W with C = 1, 3 or 4); else nothing."""

    def __init__(self, count=16):
        self.count, self.seen, self.images = count, False, None  # seen: this epoch's first step was looked at

    def on_step_end(self, trainer, batch, loss):
        if not self.seen:
            first = next(iter(batch.values() if isinstance(batch, dict) else batch), None) \
                if isinstance(batch, (dict, list, tuple)) else batch
            if torch.is_tensor(first) and first.dim() == 4 and first.shape[1] in (1, 3, 4):
                self.images = first[:self.count].detach().float().cpu()
            self.seen = True

    def on_epoch_end(self, trainer, epoch, log):
        if self.images is not None:
            low = self.images.amin(dim=(1, 2, 3), keepdim=True)
            high = self.images.amax(dim=(1, 2, 3), keepdim=True)
            trainer.tensorboard("images", "inputs/train", (self.images - low) / (high - low).clamp_min(1e-8))
        self.seen, self.images = False, None
