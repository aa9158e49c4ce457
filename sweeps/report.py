"""The trials' side of a sweep: the study's storage, and a callback reporting each epoch's value to the study."""
import logging
import math

import optuna

import utils.dist as dist
from utils.errors import ConfigError, TrainingError

PRUNERS = {"median": optuna.pruners.MedianPruner, "none": optuna.pruners.NopPruner}


def open_storage(url):
    """Optuna's RDB storage at `url`; on SQLite a writer waits up to a minute for the file's lock (the sweep and
    its running trials write at once)."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def build(spec, table, what, *args):
    """What a SPACE's sampler or pruner names: a name of `table`, or {type, args} of one."""
    spec = {"type": spec} if isinstance(spec, str) else spec
    if not isinstance(spec, dict) or spec.get("type") not in table or not isinstance(spec.get("args", {}), dict):
        raise ConfigError(f"{what}: must be one of {', '.join(table)}, or {{type, args}} of one")
    try:
        return table[spec["type"]](*args, **spec.get("args", {}))
    except TypeError as e:
        raise ConfigError(f"{what}.args: {e}") from None


def trial_id(storage, study, number):
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)


class ReportToStudy:
    """After each epoch, rank 0 reports the objective's value (e.g. val_loss) as trial `trial`'s intermediate value
    at step `epoch` and asks the study's pruner; when it says stop, every process stops (one line, exit status 1)
    and the sweep records the trial as pruned. With the study out of reach (a trial resumed by hand after its
    sweep ended): one warning, and the run goes on."""

    def __init__(self, storage, study, trial, objective, pruner="none"):
        self.storage, self.study, self.number, self.pruner = storage, study, trial, pruner
        self.metric, self.trial, self.broken = objective.split()[-1], None, False

    def on_epoch_end(self, trainer, epoch, log):
        value = log.get(self.metric)
        prune = self._report(epoch, value) if dist.is_main_process() else False
        if dist.gather_objects(prune)[0]:
            raise TrainingError(f"pruned by the sweep at epoch {epoch} ({self.metric} {value:.6g}); the run is kept")

    def _report(self, epoch, value):
        if self.broken or value is None or not math.isfinite(value):
            return False
        try:
            if self.trial is None:
                storage = open_storage(self.storage)
                study = optuna.load_study(study_name=self.study, storage=storage, pruner=build(self.pruner, PRUNERS,
                                                                                              "pruner"))
                self.trial = optuna.trial.Trial(study, trial_id(storage, self.study, self.number))
            self.trial.report(value, epoch)
            if self.trial.should_prune():
                self.trial.set_user_attr("pruned_at", epoch)
                return True
        except Exception as e:  # the run matters more than its report
            logging.getLogger("trainer").warning("sweep: cannot report to study %s: %s", self.study, str(e)[:200])
            self.broken = True
        return False
