"""BaseTrainer: the engine around the user's step (epochs, AMP, accumulation, DDP, metrics, checkpoints)."""
import contextlib
import itertools
import logging
import math
import time
from pathlib import Path

import torch

import utils.dist as dist
from base.base_metric import MetricTracker, batch_size
from logger import RunOutputs, progress_bar
from utils.checkpoint import (TRAINER_KEYS, check_resumable, is_rolling, load_model_state, position_of,
                              save_checkpoint, supersede_after)
from utils.errors import CheckpointError, ConfigError, TrainingError
from utils.preemption import PREEMPTED, StopRequest
from utils.sharding import is_folder
from utils.sharding import load as load_shards
from utils.util import get_rng_state, set_rng_state, to_device, unwrap_model

EVENTS = ("on_train_start", "on_step_end", "on_epoch_end", "on_train_end")  # a callback's optional methods


class BaseTrainer:
    """Trains `model` on `data_loader` (validating on `valid_data_loader`) with the step(batch) a subclass defines."""

    def __init__(self, model, criterion, metrics, optimizer, config, device, data_loader=None,
                 valid_data_loader=None, lr_scheduler=None, callbacks=None, data=None):
        self.model, self.criterion, self.optimizer, self.lr_scheduler = model, criterion, optimizer, lr_scheduler
        self.config, self.device, self.callbacks, self.data = config, device, callbacks or {}, data
        self.hooks = {e: [getattr(cb, e) for cb in self.callbacks.values() if hasattr(cb, e)] for e in EVENTS}
        self.data_loader, self.valid_data_loader = data_loader, valid_data_loader
        self.logger = logging.getLogger("trainer")
        self.cfg = cfg = config["trainer"]
        self.metrics = MetricTracker(metrics)  # both phases: training's values are computed before validation
        self.mnt_mode, self.mnt_metric = config.monitor
        if cfg["amp"] == "fp16" and device.type != "cuda" and optimizer is not None:  # evaluating: full precision
            raise ConfigError("trainer.amp: fp16 needs a CUDA device; use \"bf16\" on the CPU")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else None}.get(cfg["amp"])
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # off: calls pass through
        steps = cfg["len_epoch"]  # optimizer steps of accumulate_steps batches; null: one pass over the data
        self.batches_per_epoch = steps * cfg["accumulate_steps"] if steps else len(data_loader or ())
        self.distributed, self.stop_request = dist.is_distributed(), StopRequest()
        self.sharded = cfg["strategy"] == "fsdp"  # checkpoints: folders of DCP shards (utils/sharding.py)
        self.outputs = self.rolling = self.last_saved = None  # rolling: the last epoch's checkpoint, if not kept
        self.epoch = self.global_step = self.batches_done = self.best_epoch = self.not_improved_count = 0
        self.monitor_best = math.inf if self.mnt_mode == "min" else -math.inf

    def step(self, batch):  # -> (loss, output, target); see trainer/trainer.py
        raise NotImplementedError

    def callback(self, event, *args):  # self.hooks: looked up once, as on_step_end runs every step
        for method in self.hooks[event]:
            method(self, *args)

    def tensorboard(self, kind, tag, value, **kwargs):
        """writer.add_<kind>(tag, value, global step) where the run has a TensorBoard writer (rank 0, no dry run)."""
        if self.outputs is not None and self.outputs.writer is not None:
            getattr(self.outputs.writer, "add_" + kind)(tag, value, self.global_step, **kwargs)

    def state_dict(self) -> dict:
        """The whole run state as plain data (a checkpoint): every process must call it under torchrun."""
        model = unwrap_model(self.model)
        arch = type(model).__name__  # fully_shard made it FSDP<arch>, a subclass
        return {  # fsdp: the model and optimizer are saved apart, as shards
            "arch": arch.removeprefix("FSDP") if self.sharded and self.distributed else arch,
            "run_id": self.config.run_id,
            "config": self.config.config, "epoch": self.epoch + (1 if self.batches_done else 0),  # this checkpoint's
            "model": {} if self.sharded else model.state_dict(),
            "optimizer": {} if self.sharded else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": self.scaler.state_dict(), "trainer": {key: getattr(self, key) for key in TRAINER_KEYS},
            "metrics": dist.gather_objects(self.metrics.state_dict()) if self.batches_done else None,  # mid-epoch sums
            "rng": dist.gather_objects(get_rng_state()),  # one per process
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items() if hasattr(cb, "state_dict")},
            "data": self.data,  # base_data_loader.describe(): what resume and test.py check the data against
        }

    def load_state_dict(self, checkpoint: dict, path) -> None:
        """Restore everything state_dict() saved, from a checkpoint loaded by utils.checkpoint."""
        saved_by, world = len(checkpoint["rng"]), dist.world_size()
        check_resumable(checkpoint, path, self.lr_scheduler is not None, world, self.data)
        load_model_state(unwrap_model(self.model), checkpoint["model"], path, checkpoint["arch"])
        try:  # the structure was checked on loading; what does not fit this run's objects fails here
            if is_folder(path):  # an fsdp run's
                load_shards(path, unwrap_model(self.model), self.optimizer)
            else:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.lr_scheduler is not None:
                self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if checkpoint["scaler"]:
                self.scaler.load_state_dict(checkpoint["scaler"])
            if checkpoint["trainer"]["batches_done"]:
                self.metrics.load_state_dict(checkpoint["metrics"][dist.rank()], self.device)
            if saved_by == world:
                set_rng_state(checkpoint["rng"][dist.rank()])
            for name in [n for n, cb in self.callbacks.items() if hasattr(cb, "load_state_dict")]:
                self.callbacks[name].load_state_dict(checkpoint["callbacks"][name])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path}: its optimizer, scheduler, scaler, metric, RNG or callback state does "
                                  f"not fit this run ({type(e).__name__}: {str(e)[:200]})") from None
        vars(self).update((key, checkpoint["trainer"][key]) for key in TRAINER_KEYS)
        self.resumed_at = Path(path), position_of(checkpoint)  # the file and where in training it stands
        self.rolling, self.last_saved = Path(path) if is_rolling(checkpoint, path) else None, Path(path)
        if saved_by != world and dist.is_main_process():
            self.logger.warning("%s was saved by %d process(es), this run has %d: the global batch changes by %d/%d "
                                "and RNG states are not restored (correct, not bitwise)", path, saved_by, world,
                                world, saved_by)
        self.logger.info("Resumed from %s: epoch %d, step %d.", path, self.epoch, self.global_step)

    def train(self):
        """Train to trainer.epochs; Preempted after saving on SIGTERM / SIGINT, TrainingError on a NaN loss."""
        start = time.perf_counter()
        self.callback("on_train_start")  # before any output opens: a callback that refuses changes nothing
        if dist.is_main_process():  # only rank 0 writes
            if self.config.resume:  # forget what was logged and saved after the resumed checkpoint
                for moved in supersede_after(self.config.save_dir, *self.resumed_at):
                    self.logger.info("Moved %s (saved after the resumed checkpoint) to %s", moved.name, moved.parent)
            (self.config.save_dir / PREEMPTED).unlink(missing_ok=True)
            self.outputs = RunOutputs(self.config.log_dir, self.cfg["tensorboard"], (self.epoch, self.global_step),
                                      self.config.config, self.mnt_metric)
        try:
            with self.stop_request:
                self._train_epochs()
                self.callback("on_train_end")
        finally:
            if self.outputs is not None:
                self.outputs.close()
        self.logger.info("Finished at epoch %d in %.1f s; last checkpoint: %s", self.epoch, time.perf_counter() - start,
                         self.last_saved)
        if self.best_epoch:
            self.logger.info("Best %s: %.6g, epoch %d: %s", self.mnt_metric, self.monitor_best, self.best_epoch,
                             self.config.save_dir / "model_best.pth")

    def _train_epochs(self):  # a finished run (resumed) trains no epoch; its summary says where it ended
        for epoch in range(self.epoch + 1, self.cfg["epochs"] + 1):
            if self._stopped_early():
                break
            start = time.perf_counter()
            log, n_samples = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - start
            if not math.isfinite(log["loss"]):
                raise TrainingError(f"non-finite training loss ({log['loss']}) in epoch {epoch}; no checkpoint "
                                    "of these weights was written")
            if self.valid_data_loader is not None:
                valid = self.evaluate(self.valid_data_loader, f"Epoch {epoch} valid")
                log.update(("val_" + k, v) for k, v in valid.items())
            self.callback("on_epoch_end", epoch, log)  # what a callback adds to `log` is logged and monitorable
            log["lr"] = self.optimizer.param_groups[0]["lr"]
            if self.lr_scheduler is not None and self.config["lr_scheduler"]["interval"] == "epoch":
                plateau = isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                self.lr_scheduler.step(log[self.mnt_metric]) if plateau else self.lr_scheduler.step()
            log["epoch_seconds"] = time.perf_counter() - start
            log["samples_per_second"] = n_samples * dist.world_size() / train_seconds  # all processes
            self.epoch = epoch
            improved = self._update_monitor(log)
            for key, value in {"epoch": epoch, **log}.items():
                self.logger.info("    %-20s: %s", key, value)
            if self.outputs is not None:
                self.outputs.write_epoch({"epoch": epoch, **log}, self.global_step, self.monitor_best)
            stop = self._stopped_early()
            preempted = dist.any_process(self.stop_request.signum is not None, self.device)
            keep = epoch % self.cfg["save_period"] == 0 or epoch == self.cfg["epochs"] or stop or preempted
            path = self._save_checkpoint(periodic=keep or self.cfg["save_last"], best=improved, replaces=self.rolling)
            self.rolling = path if not keep and self.cfg["save_last"] else None
            if stop:
                self.logger.info("%s did not improve for %d epochs: stop.", self.mnt_metric, self.not_improved_count)
            if preempted:
                self.stop_request.stop(path, self.config.save_dir, self.global_step, dist.is_main_process())

    def train_epoch(self, epoch, max_batches=None):
        """Train one epoch (the rest of it, when resumed mid-epoch; at most max_batches): its averages, samples."""
        self.model.train()
        n = min(self.batches_per_epoch, max_batches or self.batches_per_epoch)
        done, self.batches_done, n_samples = self.batches_done, 0, 0
        if not done:
            self.metrics.reset()
        batches = itertools.islice(self.data_loader.stream((epoch - 1) * self.batches_per_epoch + done), n - done)
        bar = progress_bar(total=n, initial=done, desc=f"Epoch {epoch} train")
        for i, (batch, n_real) in enumerate(batches, start=done):
            batch = to_device(batch, self.device)
            window_start = i - i % self.cfg["accumulate_steps"]
            window = min(self.cfg["accumulate_steps"], n - window_start)  # the epoch's last may be short
            last_in_window = i + 1 == window_start + window
            if i == window_start:  # a new optimizer step begins
                self.optimizer.zero_grad(set_to_none=True)
            # DDP: average gradients across processes only on the window's last backward (FSDP: on every one)
            with contextlib.nullcontext() if last_in_window or not hasattr(self.model, "no_sync") else \
                    self.model.no_sync():
                with self.autocast():
                    loss, output, target = self.step(batch)
                self.scaler.scale(loss / window if window > 1 else loss).backward()
            self.metrics.update(loss, output, target, n_real)
            n_samples += batch_size(target)
            bar.update()
            if last_in_window:
                self._optimizer_step()
                self.batches_done = i + 1
                self.callback("on_step_end", batch, loss)
                self._after_step(epoch, n, loss, bar)
        bar.close()
        self.batches_done = 0
        return self.metrics.compute(self.device), n_samples

    def _optimizer_step(self):
        if self.cfg["clip_grad_norm"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip_grad_norm"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lr_scheduler is not None and self.config["lr_scheduler"]["interval"] == "step":
            self.lr_scheduler.step()
        self.global_step += 1

    def _after_step(self, epoch, n_batches, loss, bar):
        """Every log_step steps progress and a finite-loss check; a mid-epoch checkpoint when due or signalled."""
        log_now = (self.global_step - 1) % self.cfg["log_step"] == 0
        if log_now:  # note: a host-device sync point, so only every log_step steps
            mean = self.metrics.metrics["loss"]  # a BatchMean: its total on the device (None: only padding so far)
            total = torch.zeros((), device=self.device) if mean.total is None else mean.total
            # one small tensor, read once (separate small reads cost ~10x as much); all processes' sums
            values = dist.all_reduce(torch.stack([loss.detach().float(), total, total.new_tensor(mean.count)]))
            step_loss, total, count = values.tolist()  # the loss of this step's global batch, the epoch's so far
            step_loss, running = step_loss / dist.world_size(), total / count
            if not math.isfinite(running):  # the running mean covers every step of the epoch so far
                raise TrainingError(f"non-finite training loss in epoch {epoch}, at or before step {self.global_step} "
                                    f"(checked every trainer.log_step={self.cfg['log_step']} steps); no checkpoint "
                                    "of these weights was written")
            bar.set_postfix_str(f"loss={running:.4f}", refresh=False)
            if bar.disable:  # no bar shows the loss (not a terminal, or not rank 0): a line does (~0.15 ms)
                self.logger.debug("Train epoch %d [%d/%d] loss: %.6f", epoch, self.batches_done, n_batches, step_loss)
            if self.outputs is not None:
                self.outputs.add_step_scalar("loss/train_step", step_loss, self.global_step)
        stop = self.stop_request.signum is not None
        if self.distributed:  # the processes must stop at the same step: they agree every log_step steps
            stop = log_now and dist.any_process(stop, self.device)
        every = self.cfg["save_every_steps"]
        if stop or (every and self.global_step % every == 0 and self.batches_done < n_batches):
            path = self._save_checkpoint(periodic=True, best=False)
            if stop:
                self.stop_request.stop(path, self.config.save_dir, self.global_step, dist.is_main_process())

    def evaluate(self, loader, desc="valid", max_batches=None, model=None) -> dict:
        """Loss and metrics of `model` (default: the trained one) over `loader` and all processes, under autocast.
        Under torchrun the bare module runs, with rank 0's buffers: DDP's forward is a collective."""
        default = unwrap_model(self.model) if self.distributed else self.model
        trained, self.model = self.model, default if model is None else model
        dist.broadcast_buffers(self.model)
        self.model.eval()
        self.metrics.reset()
        try:
            with torch.no_grad():
                batches = progress_bar(itertools.islice(loader, max_batches), total=max_batches or len(loader),
                                       desc=desc)
                n_real = getattr(getattr(loader, "sampler", None), "n_real", lambda i: None)  # a BaseDataLoader's
                for i, batch in enumerate(batches):  # fsdp evaluates on even shards: their padding is left out
                    with self.autocast():
                        loss, output, target = self.step(to_device(batch, self.device))
                    self.metrics.update(loss, output, target, n_real(i))
        finally:
            self.model = trained
        return self.metrics.compute(self.device)

    def _stopped_early(self) -> bool:
        return self.cfg["early_stop"] > 0 and self.not_improved_count >= self.cfg["early_stop"]

    def _update_monitor(self, log) -> bool:
        """Record the monitored metric of this epoch; True if it improved on the best so far."""
        if self.mnt_mode == "off":
            return False
        value = log[self.mnt_metric]
        improved = value < self.monitor_best if self.mnt_mode == "min" else value > self.monitor_best
        if improved:
            self.monitor_best, self.best_epoch = value, self.epoch
        self.not_improved_count = 0 if improved else self.not_improved_count + 1
        return improved

    def _save_checkpoint(self, periodic: bool, best: bool, replaces=None):
        """Write checkpoint-epoch<N>[-step<S>].pth (then delete `replaces`) and/or model_best.pth; the path."""
        if not (periodic or best):
            return None
        local = (p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters())  # fsdp: its shard
        if dist.any_process(not all(torch.isfinite(p).all() for p in local), self.device):  # a sync per tensor
            raise TrainingError(f"non-finite weights in epoch {self.epoch + (self.batches_done > 0)} after step "
                                f"{self.global_step}; no checkpoint of them was written")
        state = self.state_dict()  # under torchrun, every process takes part
        step = self.global_step if self.batches_done else None
        path = save_checkpoint(state, self.config.save_dir, state["epoch"], step, periodic, best, self.cfg["keep_last"],
                               replaces, dist.is_main_process(), (unwrap_model(self.model), self.optimizer) if
                               self.sharded else None)
        if dist.is_main_process():
            self.logger.info("Saved %s", " and ".join([path.name] * periodic + ["model_best.pth"] * best))
        self.last_saved = path if periodic else self.last_saved
        return path
