"""Python logging for a run: console plus <log_dir>/info.log, configured from logger_config.json,
and the progress bar the console shares with it."""
import json
import logging
import logging.config
import sys
from pathlib import Path

from tqdm import tqdm

import utils.dist as dist

LOG_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
CONFIG_FILE = Path(__file__).with_name("logger_config.json")
# The template's own loggers follow trainer.verbosity; every other library's stay at WARNING.
TEMPLATE_LOGGERS = ("train", "trainer", "test")
BAR_FORMAT = "{desc} {bar:20} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"  # fits in 80 columns


class TqdmHandler(logging.StreamHandler):
    """Console handler that prints above a running progress bar instead of into its line."""

    def emit(self, record):
        if getattr(record, "file_only", False):  # e.g. the error line a program prints itself on exit
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class RunLogFile(logging.FileHandler):
    """info.log. A write the disk refuses (full, or made read-only) is dropped instead of printing a traceback per
    line: the run's next metrics.csv row or checkpoint meets the same fault and ends the run with one line."""

    def handleError(self, record):
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on rank 0 when the output is a terminal; otherwise none (the log has it all)."""
    return tqdm(iterable, leave=False, bar_format=BAR_FORMAT, dynamic_ncols=True,
                disable=None if dist.is_main_process() else True, **kwargs)


def setup_logging(log_dir=None, verbosity=2):
    """Configure logging. File handlers write into `log_dir`; with log_dir=None (a dry run, test.py)
    they are dropped and nothing is written to disk."""
    config = json.loads(CONFIG_FILE.read_text())
    for name, handler in list(config["handlers"].items()):
        if "filename" in handler:
            if log_dir is None:
                del config["handlers"][name]
                config["root"]["handlers"].remove(name)
            else:
                handler["filename"] = str(Path(log_dir) / handler["filename"])
        elif name == "console":
            handler["level"] = logging.getLevelName(LOG_LEVELS[verbosity])
    # info.log always gets INFO, whatever the console shows.
    config["loggers"] = {name: {"level": "DEBUG" if verbosity == 2 else "INFO"} for name in TEMPLATE_LOGGERS}
    logging.config.dictConfig(config)
