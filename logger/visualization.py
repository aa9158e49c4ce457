"""Per-epoch outputs of a run (rank 0): TensorBoard event files and metrics.csv."""
import csv
import io
from pathlib import Path

import torch

from utils.util import atomic_write_text


def image_batch(batch):
    """The batch's first tensor if it holds images (N, C, H, W with C in 1, 3, 4), else None."""
    first = next(iter(batch.values() if isinstance(batch, dict) else batch), None) \
        if isinstance(batch, (dict, list, tuple)) else batch
    return first if torch.is_tensor(first) and first.dim() == 4 and first.shape[1] in (1, 3, 4) else None


class TensorboardWriter:
    """A thin SummaryWriter for a run's log directory. Every scalar uses the global optimizer step
    as its x axis, so a resumed run can purge what came after its checkpoint (purge_step)."""

    def __init__(self, log_dir, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only when enabled
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add_scalars(self, prefix, values: dict, step: int):
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def add_images(self, tag, images, step: int):
        """A grid of the first 16 images of a NCHW batch, each scaled to [0, 1]."""
        images = images[:16].detach().float().cpu()
        low, high = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
        self.writer.add_images(tag, (images - low) / (high - low).clamp_min(1e-8), step)

    def close(self):
        self.writer.close()


class MetricsCSV:
    """metrics.csv: one row per epoch, appended after the epoch and before its checkpoint. A resumed run first
    rewrites it atomically without the rows after its checkpoint's epoch, which also drops a row a crash cut
    short. (Rows are not fsync'ed: a power cut may lose the last ones; a resume relies on the checkpoints.)"""

    def __init__(self, path):
        self.path = Path(path)

    def rows(self):
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate(self, last_epoch: int):
        self._write([r for r in self.rows() if int(r["epoch"]) <= last_epoch])

    def append(self, row: dict):
        if self._header() != list(row):  # new file, or new columns: rewrite it whole
            return self._write(self.rows() + [row])
        with open(self.path, "a", newline="") as f:  # the usual case reads only the header line
            csv.DictWriter(f, fieldnames=list(row), lineterminator="\n").writerow(row)

    def _header(self):
        if not self.path.is_file():
            return None
        with open(self.path, newline="") as f:
            return next(csv.reader(f), [])

    def _write(self, rows):
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out.getvalue(), self.path)


class RunOutputs:
    """metrics.csv and TensorBoard of a run. `resumed_at` (epoch, step): drop what was logged after it."""

    def __init__(self, log_dir, tensorboard: bool, resumed_at=None):
        self.csv = MetricsCSV(Path(log_dir) / "metrics.csv")
        if resumed_at is not None:
            self.csv.truncate(resumed_at[0])
        self.writer = TensorboardWriter(log_dir, resumed_at[1] + 1 if resumed_at else None) if tensorboard else None

    def write_epoch(self, log: dict, step: int, images=None):
        self.csv.append(log)
        if self.writer is not None:
            self.writer.add_scalars("train", {k: v for k, v in log.items() if k[:4] != "val_" and k != "epoch"}, step)
            self.writer.add_scalars("valid", {k[4:]: v for k, v in log.items() if k[:4] == "val_"}, step)
            if images is not None:
                self.writer.add_images("train/input", images, step)

    def write_step(self, values: dict, step: int):
        if self.writer is not None:
            self.writer.add_scalars("train_step", values, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
