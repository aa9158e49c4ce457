"""ConfigParser: read a JSON/YAML experiment config, merge defaults and command-line overrides,
validate it, and build the objects it names.

Precedence: command-line overrides > the config file (or a resumed checkpoint's config) > defaults.
Parsing has no side effects; make_run_dirs() is the one explicit step that creates directories.
"""
import copy
import difflib
import inspect
import json
from datetime import datetime
from pathlib import Path

import torch

import data_loader.data_loaders as module_data
import model.loss as module_loss
import model.metric as module_metric
import model.model as module_arch
from base.base_trainer import TRAINER_DEFAULTS, parse_monitor
from utils.errors import ConfigError

REQUIRED = object()
# key: (default, allowed type(s), description). The README's config reference mirrors this table.
TOP_LEVEL = {
    "name": (REQUIRED, str, "experiment name; runs go to <save_dir>/models/<name>/<run_id>"),
    "seed": (0, int, "seeds python, numpy and torch; fixes the data split and the shuffling"),
    "n_gpu": (1, int, "GPUs to use (0 = CPU); falls back to the CPU when none is available"),
    "arch": (REQUIRED, dict, "the model: {type: a class in model/model.py, args: its keyword arguments}"),
    "data_loader": (REQUIRED, dict, "the data: {type: a class in data_loader/data_loaders.py, args: ...}"),
    "optimizer": (REQUIRED, dict, "{type: a torch.optim class, args: ...}"),
    "loss": (REQUIRED, str, "a function in model/loss.py"),
    "metrics": ([], list, "functions in model/metric.py, computed on training and validation batches"),
    "lr_scheduler": (None, (dict, type(None)), "{type: a torch.optim.lr_scheduler class, args: ..., "
                     "interval: 'epoch' or 'step'}; null = constant learning rate"),
    "trainer": ({}, dict, "training loop settings; see the trainer table"),
}
SCHEDULER_INTERVALS = ("epoch", "step")
# Constructor arguments the programs pass themselves (train.py: seed; test.py: seed, training=False).
PROGRAM_ARGS = {"data_loader": ("seed", "training")}


def _is_optimizer(obj):
    return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer


def _is_scheduler(obj):
    base = torch.optim.lr_scheduler.LRScheduler
    return inspect.isclass(obj) and (issubclass(obj, base) or obj is torch.optim.lr_scheduler.ReduceLROnPlateau) \
        and obj is not base


def _defined_in(module):
    return lambda obj: callable(obj) and getattr(obj, "__module__", None) == module.__name__


# The only places a config's `type` (or loss / metric name) is looked up: never an arbitrary import.
SECTIONS = {
    "arch": (module_arch, _defined_in(module_arch)),
    "data_loader": (module_data, _defined_in(module_data)),
    "loss": (module_loss, _defined_in(module_loss)),
    "metrics": (module_metric, _defined_in(module_metric)),
    "optimizer": (torch.optim, _is_optimizer),
    "lr_scheduler": (torch.optim.lr_scheduler, _is_scheduler),
}


def available(section):
    """Public names that `section` may refer to, sorted."""
    module, accept = SECTIONS[section]
    return sorted(n for n in dir(module) if not n.startswith("_") and accept(getattr(module, n)))


def resolve(section, name, where):
    """The object `name` refers to in `section`'s module, or a ConfigError listing what exists."""
    names = available(section)
    if not isinstance(name, str) or name not in names:
        raise ConfigError(f"{where}: unknown name {name!r}; available: {', '.join(names)}")
    return getattr(SECTIONS[section][0], name)


def load_config_file(path):
    """Parse a .json, .yaml or .yml file into a dict; errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only YAML configs need it
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{at}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return data


def _key_paths(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield prefix + k
            yield from _key_paths(v, prefix + k + ".")


def _constructor_params(config, section_path):
    """Parameter names of the class a `<section>.args` path belongs to, if it resolves."""
    section = section_path[0]
    if len(section_path) != 2 or section_path[1] != "args" or section not in SECTIONS:
        return set()
    try:
        cls = resolve(section, config.get(section, {}).get("type"), section)
        return set(inspect.signature(cls).parameters)
    except (ConfigError, AttributeError, TypeError, ValueError):
        return set()


def apply_override(config, item):
    """Apply one `KEY.PATH=VALUE` (value read as JSON, else as a string); `+KEY.PATH=VALUE` adds a key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    add = key.startswith("+")
    path = key.lstrip("+").split(".")
    if not all(path):
        raise ConfigError(f"override {item!r}: empty key in {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = config
    for i, part in enumerate(path[:-1]):
        if part not in node and add:
            node[part] = {}
        if not isinstance(node.get(part), dict):
            return _unknown_key(config, path[:i + 1], item)
        node = node[part]
    settable = _constructor_params(config, path[:-1]) - set(PROGRAM_ARGS.get(path[0], ())) if len(path) > 1 else ()
    if path[-1] not in node and not add and path[-1] not in settable:
        return _unknown_key(config, path, item)
    node[path[-1]] = value


def _unknown_key(config, path, item):
    key = ".".join(path)
    close = difflib.get_close_matches(key, list(_key_paths(config)), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"override {item!r}: no key {key!r} in the config{hint} (prefix with + to add a new key)")


def _check_keys(section, schema, where):
    unknown = [k for k in section if k not in schema]
    if unknown:
        close = [where + k for k in difflib.get_close_matches(unknown[0], list(schema), n=3, cutoff=0.6)]
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(schema)}"
        raise ConfigError(f"{where}{unknown[0]}: unknown key{hint}")


def _check_type(value, types, where):
    types = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python, but `epochs: true` is a mistake, not 1 epoch.
    ok = any(isinstance(value, t) and not (isinstance(value, bool) and t in (int, float)) for t in types) \
        or (float in types and type(value) is int)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ConfigError(f"{where}: expected {names}, got {json.dumps(value, default=str)}")


def with_defaults(raw):
    """`raw` with every missing top-level and trainer key set to its default (a new dict)."""
    _check_keys(raw, TOP_LEVEL, "")
    config = {}
    for key, (default, types, _) in TOP_LEVEL.items():
        if key not in raw:
            if default is REQUIRED:
                raise ConfigError(f"{key}: missing required key")
            config[key] = copy.deepcopy(default)
        else:
            config[key] = copy.deepcopy(raw[key])
            _check_type(config[key], types, key)
    _check_keys(config["trainer"], TRAINER_DEFAULTS, "trainer.")
    config["trainer"] = {k: config["trainer"].get(k, copy.deepcopy(d)) for k, (d, _, _) in TRAINER_DEFAULTS.items()}
    return config


def _check_obj_section(config, section, extra=(), optional_keys=()):
    """`section` is {type, args}: the type resolves and the class accepts args (plus runtime `extra`)."""
    spec = config[section]
    _check_keys(spec, ("type", "args", *optional_keys), f"{section}.")
    if "type" not in spec:
        raise ConfigError(f"{section}.type: missing required key")
    spec.setdefault("args", {})
    _check_type(spec["args"], dict, f"{section}.args")
    for name in PROGRAM_ARGS.get(section, ()):
        if name in spec["args"]:
            raise ConfigError(f"{section}.args.{name}: set by the program, not the config"
                              + (" (the top-level seed is passed in)" if name == "seed" else ""))
    cls = resolve(section, spec["type"], f"{section}.type")
    try:
        inspect.signature(cls).bind(*extra, **spec["args"])
    except TypeError as e:
        raise ConfigError(f"{section}.args: {e} (signature: {spec['type']}{inspect.signature(cls)})") from None


def validate(config):
    """Check everything that can be checked before building anything; raise ConfigError on the first fault."""
    for key, (_, types, _) in TOP_LEVEL.items():
        _check_type(config[key], types, key)
    if not config["name"] or any(c in config["name"] for c in "/\\") or config["name"] in (".", ".."):
        raise ConfigError(f"name: {config['name']!r} must be a non-empty name without path separators")
    for key, (_, types, _) in TRAINER_DEFAULTS.items():
        _check_type(config["trainer"][key], types, f"trainer.{key}")
    t = config["trainer"]
    for key, low in (("epochs", 1), ("save_period", 1), ("log_step", 1), ("early_stop", 0), ("n_gpu", 0),
                     ("save_every_steps", 0), ("keep_last", 0), ("accumulate_steps", 1)):
        value = config[key] if key == "n_gpu" else t[key]
        if value < low:
            raise ConfigError(f"{'' if key == 'n_gpu' else 'trainer.'}{key}: must be >= {low}, got {value}")
    if t["len_epoch"] is not None and t["len_epoch"] < 1:
        raise ConfigError(f"trainer.len_epoch: must be >= 1 or null, got {t['len_epoch']}")
    if t["amp"] not in (None, "bf16", "fp16"):
        raise ConfigError(f"trainer.amp: must be \"bf16\", \"fp16\" or null, got {t['amp']!r}")
    if t["clip_grad_norm"] is not None and t["clip_grad_norm"] <= 0:
        raise ConfigError(f"trainer.clip_grad_norm: must be > 0 or null, got {t['clip_grad_norm']}")
    if isinstance(t["compile"], str) and t["compile"] not in torch.compiler.list_backends(exclude_tags=()):
        raise ConfigError(f"trainer.compile: unknown backend {t['compile']!r}; available: "
                          f"{', '.join(torch.compiler.list_backends(exclude_tags=()))}")
    if t["verbosity"] not in (0, 1, 2):
        raise ConfigError(f"trainer.verbosity: must be 0, 1 or 2, got {t['verbosity']}")
    _check_obj_section(config, "arch")
    _check_obj_section(config, "data_loader")
    _check_obj_section(config, "optimizer", extra=(None,))  # the parameters
    resolve("loss", config["loss"], "loss")
    for i, name in enumerate(config["metrics"]):
        resolve("metrics", name, f"metrics[{i}]")
    mode, _ = parse_monitor(t["monitor"], config["metrics"])
    sched = config["lr_scheduler"]
    if sched is not None:
        _check_obj_section(config, "lr_scheduler", extra=(None,),  # the optimizer: bind() checks only names
                           optional_keys=("interval",))
        sched.setdefault("interval", "epoch")
        if sched["interval"] not in SCHEDULER_INTERVALS:
            raise ConfigError(f"lr_scheduler.interval: must be 'epoch' or 'step', got {sched['interval']!r}")
        if sched["type"] == "ReduceLROnPlateau" and (mode == "off" or sched["interval"] != "epoch"):
            raise ConfigError("lr_scheduler: ReduceLROnPlateau needs trainer.monitor (it steps on the monitored "
                              "metric) and interval 'epoch'")
        if sched["type"] == "ReduceLROnPlateau" and sched["args"].get("mode", "min") != mode:
            raise ConfigError(f"lr_scheduler.args.mode: must match trainer.monitor's {mode!r}, or the learning "
                              "rate is cut while the metric improves")
    return config


class ConfigParser:
    """A validated experiment config plus where its run writes. Building one touches no files
    beyond reading the config.

    config: the resolved config (plain data). run_id: the run's name. resume: True when this
    continues an existing run (same run id and directories).
    """

    def __init__(self, raw: dict, overrides=(), run_id=None, resume=False, run_root=None):
        config = with_defaults(raw)
        for item in overrides:
            apply_override(config, item)
        config = with_defaults(config)  # an added (+) key is still checked against the schema
        self.config = validate(config)
        self.resume = resume
        if run_id is not None and (not run_id or any(c in run_id for c in "/\\") or run_id in (".", "..")):
            raise ConfigError(f"--run-id: {run_id!r} must be a non-empty name without path separators")
        self.run_id = run_id or datetime.now().strftime("%Y%m%d_%H%M%S")
        self._run_id_given = run_id is not None
        self.save_root = Path(run_root) if run_root else Path(self.config["trainer"]["save_dir"])

    def __getitem__(self, key):
        return self.config[key]

    @property
    def save_dir(self) -> Path:
        return self.save_root / "models" / self.config["name"] / self.run_id

    @property
    def log_dir(self) -> Path:
        return self.save_root / "log" / self.config["name"] / self.run_id

    def make_run_dirs(self, reuse=False) -> None:
        """Create the run's directories and write the resolved config into them.

        A new run claims its directory with an exclusive mkdir; a run id taken by a run started in
        the same second gets a numeric suffix, and an id given by --run-id that is taken is an error
        (unless `reuse`: --auto-resume restarting a run that died before its first checkpoint).
        """
        try:
            self._make_run_dirs(reuse)
        except OSError as e:
            raise ConfigError(f"trainer.save_dir: cannot create the run's directories in {self.save_root}: "
                              f"{e.strerror}") from None

    def _make_run_dirs(self, reuse):
        if not self.resume and not reuse:
            base, n = self.run_id, 0
            self.save_dir.parent.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    self.save_dir.mkdir()
                    break
                except FileExistsError:
                    if self._run_id_given:
                        raise ConfigError(f"--run-id: run {base!r} already exists in {self.save_dir.parent}; "
                                          "resume it with -r or choose another id") from None
                    n += 1
                    self.run_id = f"{base}_{n}"
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        from utils import write_json  # here, not at import: parsing must not depend on the file helpers
        write_json(self.config, self.save_dir / "config.json")

    def init_obj(self, section, *args, **kwargs):
        """Build `section`'s {type, args}: type(*args, **config args, **kwargs).

        Runtime objects (model parameters, the optimizer) come in through args / kwargs and are
        never merged into the config.
        """
        spec = self.config[section]
        overlap = set(kwargs) & set(spec["args"])
        if overlap:
            raise ConfigError(f"{section}.args: {', '.join(sorted(overlap))} is set by the program, not the config")
        cls = resolve(section, spec["type"], f"{section}.type")
        try:
            return cls(*args, **spec["args"], **kwargs)
        except (TypeError, ValueError) as e:  # how constructors reject a bad value
            raise ConfigError(f"{section}.args: {spec['type']} rejected {json.dumps(spec['args'], default=str)}: "
                              f"{e}") from None

    def init_ftn(self, section, name):
        """The loss or metric function called `name`."""
        return resolve(section, name, section)
