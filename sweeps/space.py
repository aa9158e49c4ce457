"""A sweep's search space, from a SPACE file or the grid shortcut (KEY=V1,V2,...), checked against the config
before any trial runs: each key exists, each range is non-empty, each value is one the config accepts."""
import copy
import json
import math

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from parse_config import ConfigParser, load_config_file, parse_monitor
from sweeps.report import PRUNERS, build
from utils.errors import ConfigError
from utils.registry import Registry


class Grid(optuna.samplers.GridSampler):
    """Optuna's grid, without its study.stop() when the grid is done (only study.optimize() takes that; this sweep
    counts its trials itself)."""

    after_trial = optuna.samplers.BaseSampler.after_trial  # which does nothing


SAMPLERS = {"grid": Grid, "random": lambda grid, **args: optuna.samplers.RandomSampler(**args),
            "tpe": lambda grid, **args: optuna.samplers.TPESampler(**args)}
DISTRIBUTIONS = {"int": IntDistribution, "float": FloatDistribution, "categorical": CategoricalDistribution}
SPACE_KEYS = ("parameters", "sampler", "trials", "objective", "pruner")


def from_shortcut(items) -> dict:
    """The SPACE of KEY=V1,V2,... arguments (each value read as JSON, else as a string): a grid."""
    pairs = (item.partition("=") for item in items)
    parameters = {key: [_json_or_text(v) for v in values.split(",")] for key, _, values in pairs}
    return {"parameters": parameters, "sampler": "grid"}


def _json_or_text(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_space(path) -> dict:
    space = load_config_file(path)  # JSON or YAML, size-bounded; errors name the file
    wrong = [k for k in space if k not in SPACE_KEYS]
    if wrong or not space.get("parameters") or not isinstance(space["parameters"], dict):
        raise ConfigError(f"{path}: {(wrong or ['parameters'])[0]}: a SPACE has {', '.join(SPACE_KEYS)}")
    return space


class Space:
    """The checked space: how to suggest each key path's value, sampler, pruner, objective (mode, metric), grid size."""

    def __init__(self, space, config_file):
        self.space, self.raw, self.registry = space, load_config_file(config_file), Registry()
        # suggesters: key path -> (the kind of Trial.suggest_<kind>, its arguments)
        self.base, self.suggesters = ConfigParser(copy.deepcopy(self.raw), [], self.registry), {}
        for key, value in space["parameters"].items():
            self._add(key, value)
        grid = {key: args.get("choices", []) for key, (kind, args) in self.suggesters.items()}
        self.sampler = build(space.get("sampler", "tpe"), SAMPLERS, "sampler", grid)
        self.size = math.prod(map(len, grid.values())) if isinstance(self.sampler, Grid) else None
        if self.size == 0:
            raise ConfigError(f"{next(k for k, v in grid.items() if not v)}: the grid sampler takes lists of values")
        self.pruner = space.get("pruner", "none")
        build(self.pruner, PRUNERS, "pruner")  # checked now, built in each trial
        self.objective = space.get("objective") or self.base["trainer"]["monitor"]
        try:  # the names a callback class adds to the log (its `logs`) may be the objective
            callbacks = [self.base.resolve(f"callbacks.{i}") for i in range(len(self.base["callbacks"]))]
            self.mode, self.metric = parse_monitor(self.objective, self.base.metric_names, callbacks)
        except ConfigError as e:
            raise ConfigError(str(e).replace("trainer.monitor", "objective", 1)) from None
        if self.mode == "off":
            raise ConfigError("objective: trainer.monitor is off; name one in SPACE, e.g. \"max val_accuracy\"")

    def _check(self, key, value):  # the config takes `value` at `key`; the error names the key
        try:
            ConfigParser(copy.deepcopy(self.raw), [f"{key}={json.dumps(value)}"], self.registry)
        except ConfigError as e:
            raise ConfigError(str(e) if key.lstrip("+") in str(e) else f"{key}: {e}") from None

    def _add(self, key, value):
        """A list of values (a choice), or a range {low, high[, log, step]}: ints if low, high and step are."""
        ranged = isinstance(value, dict) and {"low", "high"} <= set(value) <= {"low", "high", "log", "step"}
        if not (ranged or isinstance(value, list)):
            raise ConfigError(f"{key}: must be a list of values, or a range {{low, high[, log, step]}}")
        integer = ranged and all(isinstance(value.get(k, 1), int) for k in ("low", "high", "step"))
        kind, args = ("int" if integer else "float", value) if ranged else ("categorical", {"choices": value})
        try:  # an empty list, or low > high: an empty range
            DISTRIBUTIONS[kind](**args)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: {str(e)[:200]}") from None
        for choice in (value["low"], value["high"]) if ranged else value:
            self._check(key, choice)
        self.suggesters[key] = (kind, args)

    def suggest(self, trial) -> dict:
        """{key: value} of `trial`: what it holds already (a trial resumed), else sampled now."""
        return {key: getattr(trial, f"suggest_{kind}")(key, **args) for key, (kind, args) in self.suggesters.items()}
