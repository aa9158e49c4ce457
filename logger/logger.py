"""Python logging for a run: console plus <log_dir>/info.log, configured from logger_config.json."""
import json
import logging
import logging.config
from pathlib import Path

LOG_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
CONFIG_FILE = Path(__file__).with_name("logger_config.json")


def setup_logging(log_dir=None, verbosity=2):
    """Configure the root logger. File handlers write into `log_dir`; with log_dir=None (a dry
    run) they are dropped and nothing is written to disk."""
    config = json.loads(CONFIG_FILE.read_text())
    for name, handler in list(config["handlers"].items()):
        if "filename" in handler:
            if log_dir is None:
                del config["handlers"][name]
                config["root"]["handlers"].remove(name)
            else:
                handler["filename"] = str(Path(log_dir) / handler["filename"])
        elif handler.get("class") == "logging.StreamHandler":
            handler["level"] = logging.getLevelName(LOG_LEVELS[verbosity])
    logging.config.dictConfig(config)
