"""The trials' side of a sweep: the study's storage, and a callback reporting each epoch's value to the study."""
import logging
import time

import optuna

import utils.dist as dist
from utils.errors import ConfigError, TrainingError

PRUNERS = {"median": optuna.pruners.MedianPruner, "none": optuna.pruners.NopPruner}


def open_storage(url):
    """Optuna's RDB storage at `url`; on SQLite a writer waits up to a minute for the file's lock (the sweep and
    its running trials write at once)."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(3):  # two commands creating a new storage's tables at once: the one refused tries again
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except Exception as e:  # a mistyped URL, a server out of reach, a driver not installed
            if attempt == 2:
                raise ConfigError(f"--storage: cannot open {url}: {str(e).strip().splitlines()[0][:300]}") from None
        time.sleep(1)


def build(spec, table, what, *args):
    """What a SPACE's sampler or pruner names: a name of `table`, or {type, args} of one."""
    spec = {"type": spec} if isinstance(spec, str) else spec
    try:
        return table[spec["type"]](*args, **spec.get("args", {}))
    except (KeyError, TypeError, AttributeError) as e:  # an unknown name, or arguments it does not take
        raise ConfigError(f"{what}: must be one of {', '.join(table)}, or {{type, args}} of one ({e})") from None


def trial_id(storage, study, number):
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)


class ReportToStudy:
    """After each epoch, rank 0 reports the objective's value (e.g. val_loss) as trial `trial`'s intermediate value
    at step `epoch` and asks the study's pruner; when it says stop, every process stops (one line, exit status 1)
    and the sweep records the trial as pruned. With the study out of reach (a trial resumed by hand after its
    sweep ended): one warning, and the run goes on."""

    def __init__(self, storage, study, trial, objective, pruner="none"):
        self.storage, self.study, self.number, self.pruner = storage, study, trial, pruner
        self.metric, self.trial = objective.split()[-1], None

    def on_epoch_end(self, trainer, epoch, log):
        value, prune = log.get(self.metric), False
        try:
            if dist.is_main_process() and self.trial is not False:
                if self.trial is None:
                    storage = open_storage(self.storage)
                    pruner = build(self.pruner, PRUNERS, "pruner")
                    study = optuna.load_study(study_name=self.study, storage=storage, pruner=pruner)
                    self.trial = optuna.trial.Trial(study, trial_id(storage, self.study, self.number))
                self.trial.report(value, epoch)
                prune = self.trial.should_prune()
        except Exception as e:  # the run matters more than its report
            logging.getLogger("trainer").warning("sweep: cannot report to study %s: %s", self.study, str(e)[:200])
            self.trial = False
        if dist.gather_objects(prune)[0]:
            raise TrainingError(f"pruned by the sweep at epoch {epoch} ({self.metric} {value:.6g}); the run is kept")
