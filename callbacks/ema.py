"""A callback that keeps an exponential moving average (EMA) of the weights, an example to copy."""
import copy

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from utils import unwrap_model
from utils.errors import CheckpointError, ConfigError


class EMA:
    """After every optimizer step: ema = decay * ema + (1 - decay) * weights (torch.optim.swa_utils' EMA update,
    one fused lerp over all parameters, no host sync); buffers (e.g. BatchNorm statistics) are copied. Each
    epoch the EMA model is validated too, logged as val_ema_<metric> (trainer.monitor may name it). Its
    weights are in every checkpoint: test.py, export.py and predict.py take them with --weights ema."""

    logs = ("val_ema_{metric}",)  # what on_epoch_end adds to the log, for trainer.monitor: val_ema_loss, ...

    def __init__(self, decay=0.999):
        self.update, self.model, self.saved = get_ema_multi_avg_fn(decay), None, None

    def on_train_start(self, trainer):
        model = unwrap_model(trainer.model)
        if trainer.sharded:  # fsdp's point is that no process holds the whole model
            raise ConfigError('callbacks: EMA keeps a whole copy of the model, which trainer.strategy "fsdp" cannot')
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        try:
            if self.saved is not None:  # resumed: the average as it was
                self.model.load_state_dict(self.saved)
        except (RuntimeError, TypeError, AttributeError) as e:  # a damaged or foreign checkpoint
            raise CheckpointError(f"callbacks: the EMA weights do not fit the model ({str(e)[:200]})") from None
        self.pairs = [list(m.parameters()) for m in (self.model, model)]
        self.buffers = [list(m.buffers()) for m in (self.model, model)]

    def on_step_end(self, trainer, batch, loss):
        self.update(*self.pairs, None)
        if self.buffers[0]:
            torch._foreach_copy_(*self.buffers)

    def on_epoch_end(self, trainer, epoch, log):
        if trainer.valid_data_loader is not None:
            results = trainer.evaluate(trainer.valid_data_loader, f"Epoch {epoch} EMA valid", model=self.model)
            log.update(("val_ema_" + k, v) for k, v in results.items())

    def state_dict(self):
        return {"weights": self.model.state_dict() if self.model is not None else self.saved}

    def load_state_dict(self, state):
        self.saved = state["weights"]
