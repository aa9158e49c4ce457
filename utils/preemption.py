"""Turn SIGTERM / SIGINT into a request the training loop honours at the next step boundary."""
import signal
import threading

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
