"""Per-epoch outputs of a run (rank 0): TensorBoard event files and metrics.csv."""
import csv
import functools
import io
import json
import threading
import time
from pathlib import Path

from utils.util import atomic_write_text

STEP_BATCH, STEP_SECONDS = 10, 30  # per-step scalars go to TensorBoard's writer 10 at a time (its queue's size)


class MetricsCSV:
    """metrics.csv: one row per epoch, appended after the epoch and before its checkpoint. A resumed run first
    rewrites it atomically without the rows after its checkpoint's epoch, and without what a crash left: a
    row cut short, or the NUL bytes of a tail that never reached the disk. (Rows are not fsync'ed: a power
    cut may lose the last ones; a resume relies on the checkpoints.)"""

    def __init__(self, path):
        self.path = Path(path)

    def rows(self):
        text = self.path.read_text(errors="replace").replace("\0", "") if self.path.is_file() else ""
        rows = csv.DictReader(io.StringIO(text, newline=""))
        return [r for r in rows if (r.get("epoch") or "").isdigit() and None not in r and None not in r.values()]

    def truncate(self, last_epoch: int):
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a rewrite cut short
            stale.unlink()
        if self.path.is_file():
            self._write([r for r in self.rows() if int(r["epoch"]) <= last_epoch])

    def append(self, row: dict):
        if self.path.is_file():
            with open(self.path, "a+", newline="") as f:  # "a+": reads where it seeks to, writes at the end
                f.seek(0)
                if next(csv.reader(f), []) == list(row):  # the usual case reads only the header line
                    return csv.DictWriter(f, fieldnames=list(row), lineterminator="\n").writerow(row)
        self._write(self.rows() + [row])  # new file, or new columns: rewrite it whole

    def _write(self, rows):
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out.getvalue(), self.path)


class RunOutputs:
    """metrics.csv and TensorBoard of a run. `resumed_at` (epoch, step): drop what was logged after it (a fresh
    run passes (0, 0): what an attempt that crashed before its first checkpoint logged goes).
    Every scalar uses the global optimizer step as its x axis, so TensorBoard's purge_step can do that.
    TensorBoard groups by metric (loss/train, loss/valid, with a custom chart overlaying the two), keeps
    optimizer/lr and time/ apart, and gets the config as text and as hparams, so runs compare side by side."""

    def __init__(self, log_dir, tensorboard: bool, resumed_at, config, monitor=None):
        self.csv = MetricsCSV(Path(log_dir) / "metrics.csv")
        self.csv.truncate(resumed_at[0])
        # run_info: the config, written to TensorBoard with the first epoch, when the metric names are known
        self.writer, self.monitor, self.run_info = None, monitor, config
        self.steps, self.steps_since = [], 0.0  # per-step scalars not yet handed to the writer, and since when
        events = list(Path(log_dir).glob("events.out.tfevents.*"))
        if events and resumed_at[1] == 0:
            # An attempt that kept no step: its events go whole, leaving nothing to purge. (purge_step would rely
            # on the new file sorting after the old one, which its name, <time in seconds>.<host>.<pid>, does not
            # ensure.)
            while events:
                events.pop().unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow to import: only when enabled
            if getattr(threading.excepthook, "func", None) is not _quiet_writer_thread:  # wrap the hook in place once
                threading.excepthook = functools.partial(_quiet_writer_thread, threading.excepthook)
            self.writer = SummaryWriter(str(log_dir), purge_step=resumed_at[1] + 1 if events else None)

    def add_step_scalar(self, tag, value, step):
        """A scalar logged every few steps. Handing one to TensorBoard's writer thread wakes it, which costs about
        0.1 ms on the training thread; in batches it costs a quarter of that. The writer itself writes its file
        only every 2 minutes, so a batch held for at most STEP_SECONDS delays little."""
        if self.writer is not None:
            self.steps.append((tag, value, step))
            self.steps_since = self.steps_since or time.monotonic()
            if len(self.steps) >= STEP_BATCH or time.monotonic() - self.steps_since > STEP_SECONDS:
                self.flush_steps()

    def flush_steps(self):
        for tag, value, step in self.steps:
            self.writer.add_scalar(tag, value, step)
        self.steps, self.steps_since = [], 0.0

    def write_epoch(self, log: dict, step: int, best=None):
        """One epoch's row (and scalars); `best`: the monitored metric's best value so far (with a monitor)."""
        self.csv.append(log)
        if self.writer is None:
            return
        self.flush_steps()
        if self.run_info is not None:
            self._write_run_info(log)
            self.run_info = None
        for key, value in log.items():
            if key != "epoch":
                self.writer.add_scalar(scalar_tag(key), value, step)
        if self.monitor is not None:
            self.writer.add_scalar(f"best/{self.monitor}", best, step)

    def _write_run_info(self, log):
        """The config as text and as hparams (flattened key paths), with the metrics the HPARAMS tab lists."""
        from torch.utils.tensorboard.summary import hparams
        self.writer.add_text("config", "```\n" + json.dumps(self.run_info, indent=2) + "\n```")
        tags = [tag for tag in map(scalar_tag, log) if tag.endswith(("/train", "/valid"))]
        self.writer.add_custom_scalars({"train and valid": {m: ["Multiline", [f"{m}/train", f"{m}/valid"]]
                                                            for m in sorted({tag.split("/")[0] for tag in tags})}})
        tags += [f"best/{self.monitor}"] * (self.monitor is not None)
        for summary in hparams(flatten(self.run_info), dict.fromkeys(tags, 0.0))[:2]:  # experiment, session start
            self.writer.file_writer.add_summary(summary)

    def close(self):
        if self.writer is not None:
            self.flush_steps()
            self.writer.close()


def scalar_tag(key: str) -> str:
    """metrics.csv column -> TensorBoard tag: loss -> loss/train, val_loss -> loss/valid, lr -> optimizer/lr,
    epoch_seconds -> time/epoch_seconds."""
    if key in ("lr", "epoch", "epoch_seconds", "samples_per_second"):
        return "optimizer/lr" if key == "lr" else f"time/{key}"
    return f"{key[4:]}/valid" if key.startswith("val_") else f"{key}/train"


def flatten(tree, prefix="") -> dict:
    """{"optimizer.args.lr": 0.002, ...}: numbers, strings and booleans as they are, lists as JSON text."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def _quiet_writer_thread(default, args):
    """TensorBoard's writer thread prints a failed write (a full disk, a read-only directory) as a traceback; the
    trainer's next TensorBoard call raises the same error, which train.py reports in one line."""
    if not (issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
        default(args)
