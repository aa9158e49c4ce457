"""BaseTrainer: the epoch loop, monitoring, early stopping, checkpoints, resume and per-epoch outputs.

Subclasses implement _train_epoch(epoch) -> dict of that epoch's numbers (see trainer/trainer.py).
"""
import logging
import math
import signal
from pathlib import Path

import torch

import utils.dist as dist
from logger.visualization import MetricsCSV, TensorboardWriter
from utils.checkpoint import (checkpoint_name, list_checkpoints, load_model_state, position_of, serialize,
                              supersede_after)
from utils.errors import ConfigError, TrainingError
from utils.preemption import Preempted, StopRequest
from utils.util import atomic_write_bytes, get_rng_state, set_rng_state, unwrap_model

NoneType = type(None)
# key: (default, allowed type(s), description). The README's config reference mirrors this table.
TRAINER_DEFAULTS = {
    "epochs": (10, int, "epochs to train (>= 1)"),
    "save_dir": ("saved/", str, "root of the run outputs: <save_dir>/models and <save_dir>/log"),
    "save_period": (1, int, "write checkpoint-epoch<N>.pth every this many epochs; the last epoch is always saved"),
    "verbosity": (2, int, "console log level: 0 warnings, 1 info, 2 debug (per-step lines)"),
    "monitor": ("off", str, "'min METRIC', 'max METRIC' or 'off': picks model_best.pth and drives early stopping"),
    "early_stop": (0, int, "stop after this many consecutive epochs without improvement; 0 = never"),
    "tensorboard": (True, bool, "write TensorBoard event files into the run's log directory"),
    "log_step": (10, int, "every this many steps: log the loss, refresh the progress bar (a host sync)"),
    "len_epoch": (None, (int, NoneType), "optimizer steps per epoch (iteration-based); null = one pass over the data"),
    "save_every_steps": (0, int, "also write checkpoint-epoch<E>-step<S>.pth every this many optimizer steps "
                                 "(an exact mid-epoch resume point); 0 = off"),
    "amp": (None, (str, NoneType), "mixed precision: \"bf16\" (CPU or CUDA), \"fp16\" (CUDA, with a gradient "
                                   "scaler) or null = full precision"),
    "accumulate_steps": (1, int, "batches whose gradients are summed into one optimizer step"),
    "clip_grad_norm": (None, (float, NoneType), "clip the gradients' total norm to this value; null = no clipping"),
    "compile": (False, (bool, str), "wrap the model with torch.compile (true, or the name of a torch.compile backend)"),
    "keep_last": (0, int, "keep only the newest this many checkpoint-epoch*.pth files (model_best.pth is "
                          "kept apart); 0 = keep all"),
}


def parse_monitor(monitor: str, metric_names):
    """('min'|'max', metric) from a trainer.monitor string, or ('off', None); ConfigError if malformed."""
    if monitor == "off":
        return "off", None
    names = ["loss", *metric_names]
    names += ["val_" + n for n in names]
    parts = monitor.split()
    if len(parts) != 2 or parts[0] not in ("min", "max") or parts[1] not in names:
        raise ConfigError(f"trainer.monitor: {monitor!r} is not 'off' or 'min|max METRIC' "
                          f"with METRIC one of {', '.join(names)}")
    return parts[0], parts[1]


class BaseTrainer:
    """Runs epochs start_epoch..epochs, keeping the best model and the resume points.

    config: the ConfigParser of the run (its resolved config, run id and directories).
    """

    def __init__(self, model, criterion, metric_ftns, optimizer, config, device, lr_scheduler=None):
        self.config = config
        self.logger = logging.getLogger("trainer")
        self.model = model
        self.criterion = criterion
        self.metric_ftns = metric_ftns
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.device = device

        cfg = config["trainer"]
        self.epochs = cfg["epochs"]
        self.save_period = cfg["save_period"]
        self.early_stop = cfg["early_stop"]
        self.save_every_steps = cfg["save_every_steps"]
        self.keep_last = cfg["keep_last"]
        self.stop_request = StopRequest()
        self.mnt_mode, self.mnt_metric = parse_monitor(cfg["monitor"], [m.__name__ for m in metric_ftns])
        # Training state: everything here goes into state_dict() and so into every checkpoint.
        self.epoch = 0  # last finished epoch
        self.global_step = 0  # optimizer steps taken
        self.mnt_best = math.inf if self.mnt_mode == "min" else -math.inf
        self.not_improved_count = 0
        self.scaler = None  # a torch.amp.GradScaler, set by subclasses that use one
        self.writer = None
        self.csv = None

    def _train_epoch(self, epoch) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step,
                "monitor_best": self.mnt_best, "not_improved_count": self.not_improved_count}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.global_step = state["global_step"]
        self.mnt_best = state["monitor_best"]
        self.not_improved_count = state["not_improved_count"]

    def train(self):
        """Train to the configured number of epochs, writing logs, metrics.csv and checkpoints.

        Raises Preempted after saving the exact position when SIGTERM / SIGINT arrives, and
        TrainingError (saving nothing) when the loss stops being finite.
        """
        self._open_outputs()
        try:
            with self.stop_request:
                self._train_epochs()
        finally:
            self._close_outputs()

    def _train_epochs(self):
        if self._stopped_early():
            self.logger.info("This run already stopped early at epoch %d; nothing to do.", self.epoch)
        for epoch in range(self.epoch + 1, self.epochs + 1):
            if self._stopped_early():
                break
            log = {"epoch": epoch, **self._train_epoch(epoch)}
            if not math.isfinite(log["loss"]):
                raise TrainingError(f"non-finite training loss ({log['loss']}) in epoch {epoch}; no checkpoint "
                                    "of these weights was written")
            self.epoch = epoch
            improved = self._update_monitor(log)
            for key, value in log.items():
                self.logger.info("    %-20s: %s", key, value)
            self._write_epoch_outputs(log)
            stop = self._stopped_early()
            preempted = dist.any_process(self.stop_request.signum is not None, self.device)
            periodic = epoch % self.save_period == 0 or epoch == self.epochs or stop or preempted
            path = self._save_checkpoint(epoch, periodic=periodic, best=improved)
            if stop:
                self.logger.info("%s did not improve for %d epochs: training stops.",
                                 self.mnt_metric, self.not_improved_count)
            if preempted:
                self._preempted(path)

    def _preempted(self, path):
        signum = self.stop_request.signum or signal.SIGTERM  # under torchrun another rank may have got it
        self.logger.warning("Stopped by %s after step %d; saved %s. Resume with: python train.py -r %s",
                            signal.Signals(signum).name, self.global_step, path.name, path)
        raise Preempted(signum, path)

    def _stopped_early(self) -> bool:
        return self.early_stop > 0 and self.not_improved_count >= self.early_stop

    def _update_monitor(self, log) -> bool:
        """Record the monitored metric of this epoch; True if it improved on the best so far."""
        if self.mnt_mode == "off":
            return False
        value = log[self.mnt_metric]
        improved = value < self.mnt_best if self.mnt_mode == "min" else value > self.mnt_best
        if improved:
            self.mnt_best, self.not_improved_count = value, 0
        else:
            self.not_improved_count += 1
        return improved

    def _open_outputs(self):
        if not dist.is_main_process():  # only rank 0 writes
            return
        log_dir = self.config.log_dir
        self.csv = MetricsCSV(log_dir / "metrics.csv")
        if self.config.resume:  # forget what was logged after the checkpoint we resume from
            self.csv.truncate(self.epoch)
            for stale in Path(self.config.save_dir).glob(".*.tmp"):  # a save cut short by a crash
                stale.unlink()
            for moved in supersede_after(self.config.save_dir, self._resumed_at):
                self.logger.info("Moved %s, saved after the resumed checkpoint, to superseded/", moved.name)
        if self.config["trainer"]["tensorboard"]:
            self.writer = TensorboardWriter(log_dir, purge_step=self.global_step + 1 if self.config.resume else None)

    def _close_outputs(self):
        if self.writer is not None:
            self.writer.close()

    def _write_epoch_outputs(self, log):
        if self.csv is None:
            return
        self.csv.append(log)
        if self.writer is not None:
            train = {k: v for k, v in log.items() if not k.startswith("val_") and k != "epoch"}
            valid = {k[4:]: v for k, v in log.items() if k.startswith("val_")}
            self.writer.add_scalars("train", train, self.global_step)
            self.writer.add_scalars("valid", valid, self.global_step)

    def _checkpoint(self, epoch, trainer_state=None) -> dict:
        model = unwrap_model(self.model)
        return {
            "arch": type(model).__name__,
            "epoch": epoch,
            "run_id": self.config.run_id,
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "trainer": trainer_state or self.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": dist.gather_objects(get_rng_state()),  # one per process
            "config": self.config.config,
        }

    def _save_checkpoint(self, epoch, periodic: bool, best: bool, step=None, trainer_state=None):
        """Write checkpoint-epoch<N>[-step<S>].pth and/or model_best.pth from one serialization;
        return the path written (or None). Each file is replaced atomically, and older
        checkpoints beyond keep_last are deleted only after the new one is on disk."""
        if not (periodic or best):
            return None
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):  # one host sync per tensor
            raise TrainingError(f"non-finite weights in epoch {epoch} after step {self.global_step}; no checkpoint "
                                "of them was written")
        checkpoint = self._checkpoint(epoch, trainer_state)  # under torchrun, every process takes part
        path = self.config.save_dir / (checkpoint_name(epoch, step) if periodic else "model_best.pth")
        if not dist.is_main_process():
            return path
        data = serialize(checkpoint)
        if periodic:
            atomic_write_bytes(data, path)
            self.logger.info("Saving checkpoint: %s ...", path)
            if self.keep_last:
                for old in list_checkpoints(self.config.save_dir)[:-self.keep_last]:
                    old.unlink()
        if best:
            atomic_write_bytes(data, self.config.save_dir / "model_best.pth")
            self.logger.info("Saving current best: model_best.pth ...")
        return path

    def resume(self, checkpoint: dict, path) -> None:
        """Restore model, optimizer, scheduler, counters and RNG states from a loaded checkpoint."""
        load_model_state(unwrap_model(self.model), checkpoint, path)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if (checkpoint["lr_scheduler"] is None) != (self.lr_scheduler is None):
            raise ConfigError(f"{path}: lr_scheduler differs from the one the checkpoint was trained with")
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if self.scaler is not None and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.load_state_dict(checkpoint["trainer"])
        self._resumed_at = position_of(checkpoint)
        if len(checkpoint["rng"]) == dist.world_size():
            set_rng_state(checkpoint["rng"][dist.rank()])
        else:
            self.logger.warning("%s was saved by %d processes, this run has %d: RNG states not restored, "
                                "so the run continues correctly but not bitwise as it would have.",
                                path, len(checkpoint["rng"]), dist.world_size())
        self.logger.info("Resumed from %s: epoch %d, step %d.", path, self.epoch, self.global_step)
