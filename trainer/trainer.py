"""Trainer: one epoch of training and validation. The loop around it is in base/base_trainer.py."""
import contextlib
import itertools
import math
import time

import torch
from tqdm import tqdm

import utils.dist as dist
from base import BaseTrainer
from utils.errors import CheckpointError, ConfigError, TrainingError


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on rank 0 when the output is a terminal; otherwise none (the log has it all)."""
    return tqdm(iterable, leave=False, disable=None if dist.is_main_process() else True, **kwargs)


def batch_values(loss, output, target, metric_ftns, device):
    """A batch's loss and metrics as one float32 tensor on the device (no host sync)."""
    values = [loss.detach()] + [m(output, target) for m in metric_ftns]
    return torch.stack([torch.as_tensor(v, device=device).float() for v in values])


def averages(names, sums, n_samples) -> dict:
    """Sums over samples -> means; under torchrun, over the samples of all processes."""
    totals = dist.all_reduce_sum(torch.cat([sums, sums.new_tensor([n_samples])]))
    return dict(zip(names, (totals[:-1] / totals[-1].clamp_min(1)).tolist()))  # one host sync


def evaluate(model, batches, criterion, metric_ftns, device, autocast=contextlib.nullcontext) -> dict:
    """Loss and metrics of `model` over `batches`, averaged weighted by batch size (over all
    processes under torchrun); `autocast` is the mixed-precision context the training uses."""
    model.eval()
    names = ["loss", *(m.__name__ for m in metric_ftns)]
    sums = torch.zeros(len(names), device=device)
    n_samples = 0
    with torch.no_grad():
        for data, target in batches:
            data = data.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with autocast():
                output = model(data)
                loss = criterion(output, target)
            sums += batch_values(loss, output, target, metric_ftns, device) * len(target)
            n_samples += len(target)
    return averages(names, sums, n_samples)


class Trainer(BaseTrainer):
    """Trains `model` on `data_loader`, validating on `valid_data_loader` (optional) each epoch.

    Loss and metric sums stay on the device and are read on the host only every
    trainer.log_step steps and at the end of an epoch.
    """

    def __init__(self, model, criterion, metric_ftns, optimizer, config, device,
                 data_loader, valid_data_loader=None, lr_scheduler=None):
        super().__init__(model, criterion, metric_ftns, optimizer, config, device, lr_scheduler)
        self.data_loader = data_loader
        self.valid_data_loader = valid_data_loader
        cfg = config["trainer"]
        self.accumulate_steps = cfg["accumulate_steps"]
        # len_epoch counts optimizer steps, each of accumulate_steps batches; without it an epoch
        # is one pass over the data, its last step taking whatever batches remain.
        self.batches_per_epoch = cfg["len_epoch"] * self.accumulate_steps if cfg["len_epoch"] else len(data_loader)
        self.log_step = cfg["log_step"]
        self.clip_grad_norm = cfg["clip_grad_norm"]
        if cfg["amp"] == "fp16" and device.type != "cuda":
            raise ConfigError("trainer.amp: fp16 needs a CUDA device; use \"bf16\" on the CPU")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        # Loss scaling only for fp16; disabled, the scaler passes calls straight through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
        self.scheduler_per_step = lr_scheduler is not None and config["lr_scheduler"]["interval"] == "step"
        self.metric_names = ["loss", *(m.__name__ for m in metric_ftns)]
        if (self.mnt_metric or "").startswith("val_") and valid_data_loader is None:
            raise ConfigError(f"trainer.monitor: {self.mnt_metric} needs a validation split, "
                              "but the data loader has none (data_loader.args.validation_split)")
        self.distributed = dist.is_distributed()
        self._sample_images = None
        self._progress = None  # (batches_done, sums, n_samples) of an epoch resumed mid-way

    def state_dict(self) -> dict:
        return {**super().state_dict(), "batches_done": 0, "partial": None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state["batches_done"]:
            if len(state["partial"]) != dist.world_size():
                raise CheckpointError(f"this mid-epoch checkpoint was saved by {len(state['partial'])} processes; "
                                      f"resume it with as many, or resume an end-of-epoch checkpoint")
            partial = state["partial"][dist.rank()]  # this process's share of the epoch so far
            self._progress = (state["batches_done"], partial["sums"].to(self.device), partial["n_samples"])

    def _batch_stream(self, start):
        """Training batches from global batch number `start` on, pass after pass over the data.

        Pass p uses the loader's order for epoch p, so where a batch comes from depends only on
        its number: an iteration-based epoch can end mid-pass and the next one picks up there.
        """
        passes, position = divmod(start, len(self.data_loader))
        for p in itertools.count(passes):
            self.data_loader.set_epoch(p, start_batch=position)
            yield from self.data_loader
            position = 0

    def _train_epoch(self, epoch) -> dict:
        start = time.perf_counter()
        self._sample_images = None
        train, n_samples = self._train_phase(epoch)
        train_seconds = time.perf_counter() - start
        log = dict(train)
        if self.valid_data_loader is not None:
            log.update(("val_" + k, v) for k, v in self._valid_phase(epoch).items())
        log["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.lr_scheduler is not None and not self.scheduler_per_step:
            if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.lr_scheduler.step(log[self.mnt_metric])
            else:
                self.lr_scheduler.step()
        log["epoch_seconds"] = time.perf_counter() - start
        log["samples_per_second"] = n_samples * dist.world_size() / train_seconds  # all processes
        if self.writer is not None and self._sample_images is not None:
            self.writer.add_images("train/input", self._sample_images, self.global_step)
        return log

    def _train_phase(self, epoch, max_batches=None):
        """Train one epoch; the averages of loss and metrics, weighted by batch size, and the number
        of samples trained in this call (a resumed epoch counts only the rest)."""
        self.model.train()
        n_batches = min(self.batches_per_epoch, max_batches or self.batches_per_epoch)
        done, sums, n_samples = self._progress or (0, torch.zeros(len(self.metric_names), device=self.device), 0)
        self._progress = None
        restored = n_samples
        batches = itertools.islice(self._batch_stream((epoch - 1) * self.batches_per_epoch + done), n_batches - done)
        bar = progress_bar(total=n_batches, initial=done, desc=f"Epoch {epoch} train")
        for batch_idx, (data, target) in enumerate(batches, start=done):
            data = data.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            window_start = batch_idx - batch_idx % self.accumulate_steps
            window = min(self.accumulate_steps, n_batches - window_start)  # the epoch's last may be short
            last_in_window = batch_idx + 1 == window_start + window

            if batch_idx == window_start:  # a new optimizer step begins
                self.optimizer.zero_grad(set_to_none=True)
            # DDP: average gradients across processes only on the window's last backward
            with contextlib.nullcontext() if last_in_window or not self.distributed else self.model.no_sync():
                with self.autocast():
                    output = self.model(data)
                    loss = self.criterion(output, target)
                self.scaler.scale(loss / window if window > 1 else loss).backward()
            sums += batch_values(loss, output, target, self.metric_ftns, self.device) * len(target)
            n_samples += len(target)
            bar.update()
            if not last_in_window:
                continue
            if self.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scheduler_per_step:
                self.lr_scheduler.step()
            self.global_step += 1

            if self._sample_images is None:
                self._sample_images = data
            self._after_step(epoch, batch_idx + 1, n_batches, loss, sums, n_samples, bar)
        bar.close()
        return averages(self.metric_names, sums, n_samples), n_samples - restored

    def _after_step(self, epoch, batches_done, n_batches, loss, sums, n_samples, bar):
        """After an optimizer step: progress logging every log_step steps; a mid-epoch checkpoint
        when one is due or a signal asked to stop (then raise Preempted)."""
        if (self.global_step - 1) % self.log_step == 0:
            self._log_progress(bar, epoch, batches_done, n_batches, loss, sums / n_samples)
        stop = self._stop_requested()
        due = self.save_every_steps and self.global_step % self.save_every_steps == 0 and batches_done < n_batches
        if not (stop or due):
            return
        state = self.state_dict()
        partial = dist.gather_objects({"sums": sums.cpu(), "n_samples": n_samples})
        state.update(batches_done=batches_done, partial=partial)
        path = self._save_checkpoint(epoch, periodic=True, best=False, step=self.global_step, trainer_state=state)
        if stop:
            self._preempted(path)

    def _stop_requested(self) -> bool:
        """Whether a signal asked to stop. Under torchrun the processes must stop at the same step,
        so they agree on it (a collective) every log_step steps."""
        requested = self.stop_request.signum is not None
        if not self.distributed:
            return requested
        # the same steps _log_progress syncs on, so no extra host sync
        return (self.global_step - 1) % self.log_step == 0 and dist.any_process(requested, self.device)

    def _valid_phase(self, epoch, max_batches=None):
        """Evaluate on the validation split; averages weighted by batch size."""
        batches = itertools.islice(self.valid_data_loader, max_batches)
        bar = progress_bar(batches, total=max_batches or len(self.valid_data_loader), desc=f"Epoch {epoch} valid")
        return evaluate(self.model, bar, self.criterion, self.metric_ftns, self.device, self.autocast)

    def _log_progress(self, bar, epoch, batches_done, n_batches, loss, running):
        # note: a host-device sync point; it runs only every log_step steps
        step_loss, *running_means = torch.cat([loss.detach().float().view(1), running]).tolist()
        if not math.isfinite(running_means[0]):  # the running mean covers every step of the epoch so far
            raise TrainingError(f"non-finite training loss in epoch {epoch}, at or before step {self.global_step} "
                                f"(checked every trainer.log_step={self.log_step} steps); no checkpoint of "
                                "these weights was written")
        bar.set_postfix({name: f"{v:.4f}" for name, v in zip(self.metric_names[:2], running_means)}, refresh=False)
        self.logger.debug("Train epoch %d [%d/%d] loss: %.6f", epoch, batches_done, n_batches, step_loss)
        if self.writer is not None:
            self.writer.add_scalars("train_step", {"loss": step_loss}, self.global_step)

    def dry_run(self, batches=2):
        """Train `batches` batches and validate on `batches` batches; write nothing."""
        self.save_every_steps = 0  # no mid-epoch checkpoints: a dry run has no run directory
        self._progress = None  # from the first batch of the next epoch, even when resuming mid-epoch
        train, _ = self._train_phase(self.epoch + 1, max_batches=batches)
        self.logger.info("dry run: %d training batches: %s", batches, train)
        if self.valid_data_loader is not None:
            valid = self._valid_phase(self.epoch + 1, max_batches=batches)
            self.logger.info("dry run: %d validation batches: %s", batches, valid)
