"""Trainer: the training step, which is yours to change. The engine around it (AMP, gradient
accumulation, DDP, clipping, the optimizer and scheduler, metrics, checkpoints, exact resume) is
in base/base_trainer.py; you should not need to read it to change the step."""
from base import BaseTrainer


class Trainer(BaseTrainer):
    def step(self, batch):
        """One batch -> (loss, output, target); used for training and evaluation.

        `batch` is what the data loader yields, already on the device: here (inputs, targets).
        The loss drives backward(); the metrics get (output, target). For other batch shapes
        (dicts, several inputs), override this method; nothing else needs to change.
        """
        data, target = batch
        output = self.model(data)
        return self.criterion(output, target), output, target
