"""Turn SIGTERM / SIGINT into a request the training loop honours at the next step boundary."""
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised by the Trainer after it saved a checkpoint in answer to a signal; exit with 128 + signum."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class StopRequest:
    """Context manager: while active, the first SIGTERM or SIGINT only sets `signum`, which the
    Trainer polls between steps (so it can finish the step and save the exact position); a second
    one exits at once with status 128 + signum."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
