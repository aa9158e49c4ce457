"""Turn SIGTERM / SIGINT into a request the training loop honours at the next step boundary."""
import logging
import signal
import threading
from pathlib import Path

from utils.util import write_json

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PREEMPTED = "preempted.json"  # in the run directory while the run is stopped by a signal


class Preempted(Exception):
    """Raised by the Trainer after it saved a checkpoint in answer to a signal; exit with 128 + signum."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class StopRequest:
    """While active, the first SIGTERM or SIGINT only sets `signum`, which the Trainer polls between
    steps (it finishes the step and saves the exact position); a second SIGINT exits at once (130)."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def _handle(self, signum, frame):
        # A second Ctrl-C means "now"; a repeated SIGTERM does not: a cluster scheduler signals every
        # process and torchrun forwards its own SIGTERM a moment later. The hard stop is SIGKILL.
        if self.signum is not None and signum == signal.SIGINT:
            raise SystemExit(128 + signum)
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            # Stopping: a repeated SIGTERM must not kill the process before it exits with 128 + signum.
            stopping = s == signal.SIGTERM and self.signum == signal.SIGTERM
            signal.signal(s, signal.SIG_IGN if stopping else handler)
        self._previous = {}

    def stop(self, checkpoint, run_dir, step, write: bool):
        """Raise Preempted, after leaving <run_dir>/preempted.json (`write`: rank 0): torchrun exits 1 for a
        preemption as for a crash, so a job script tells them apart by this file (removed when the run resumes)."""
        signum = self.signum or signal.SIGTERM  # under torchrun another rank may have got it
        name = signal.Signals(signum).name
        if write:
            write_json({"signal": name, "checkpoint": str(checkpoint)}, Path(run_dir) / PREEMPTED)
            logging.getLogger("trainer").warning("Stopped by %s after step %d; saved %s. Resume with: python train.py "
                                                 "-r %s", name, step, Path(checkpoint).name, checkpoint)
        raise Preempted(signum, checkpoint)
