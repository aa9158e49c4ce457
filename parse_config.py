"""ConfigParser: merge defaults and command-line overrides into a config, validate it, build what it names.

Precedence: command-line overrides > the config file (or a resumed checkpoint's config) > defaults. Parsing has no
side effects (make_run_dirs() creates the directories); it builds only names of the Registry it is handed."""
import contextlib
import copy
import functools
import inspect
import itertools
import json
from datetime import datetime
from pathlib import Path

import torch

from base.base_metric import snake_case
from base.base_model import build_pretrained
from base.base_trainer import EVENTS, BaseTrainer
from utils.config_file import (apply_override, chain_length, check_keys, check_type, get_path, is_name,  # noqa: F401
                               load_config_file, object_paths, spec_of, takes_functions, where)
from utils.errors import REQUIRED, ConfigError, DataError
from utils.schema import LOADER_DEFAULTS, TOP_LEVEL, TRAINER_DEFAULTS
from utils.sharding import restore_or_remove
from utils.util import claim_dir, lock_dir, write_json

# Where a bare name is looked up after the project's own packages.
DEFAULT_MODULES = {"optimizer": "torch.optim", "lr_scheduler": "torch.optim.lr_scheduler",
                   "train_transform": "torchvision.transforms.v2", "eval_transform": "torchvision.transforms.v2"}
MINIMUM = {"n_gpu": 0, "seed": 0, "trainer.epochs": 1, "trainer.save_period": 1, "trainer.log_step": 1,
           "trainer.early_stop": 0, "trainer.keep_last": 0, "trainer.save_every_steps": 0,
           "trainer.accumulate_steps": 1, "data_loader.batch_size": 1, "data_loader.prefetch_factor": 1}
MAXIMUM = {"seed": 2**32 - 1}  # numpy's limit; every other integer at most 2**31 - 1
RESERVED = ("loss", "epoch", "lr", "epoch_seconds", "samples_per_second")  # columns the trainer writes itself
EXTRA_KEYS = {"valid_dataset": ("optional",), "test_dataset": ("optional",), "metrics": ("name",),
              "callbacks": ("name",), "lr_scheduler": ("interval",)}
A_NAME = "a name of 1-200 printable characters without path separators"


def parse_monitor(monitor: str, metric_names, callbacks=()):
    """('min'|'max', metric) or ('off', None) from trainer.monitor; a callback class may add names in `logs`."""
    if monitor == "off":
        return "off", None
    logged = ["loss", *metric_names]
    names = logged + ["val_" + n for n in logged]
    names += [key.format(metric=n) for cls in callbacks for key in getattr(cls, "logs", ()) for n in logged]
    parts = monitor.split()
    if len(parts) != 2 or parts[0] not in ("min", "max") or parts[1] not in names:
        raise ConfigError(f"trainer.monitor: {monitor[:80]!r} is not 'off' or 'min|max METRIC' "
                          f"with METRIC one of {', '.join(names)}")
    return parts[0], parts[1]


def with_defaults(raw):
    """`raw` with every missing key of the top level, data_loader and trainer set to its default."""
    config = dict(raw)
    for section, schema in (("", TOP_LEVEL), ("data_loader", LOADER_DEFAULTS), ("trainer", TRAINER_DEFAULTS)):
        given, prefix = (config[section], f"{section}.") if section else (config, "")
        check_keys(given, schema, prefix)
        for key, (default, types, _) in schema.items():
            if key not in given and default is REQUIRED:
                raise ConfigError(f"{prefix}{key}: missing required key")
            given[key] = copy.deepcopy(given.get(key, default))
            check_type(given[key], types, prefix + key)
    return config


def _arg(value):
    """A string naming a torch dtype ("torch.float32") becomes that dtype, also inside a dict or list (ToDtype's
    per-type dtypes); JSON cannot hold one."""
    if isinstance(value, (dict, list)):
        return {k: _arg(v) for k, v in value.items()} if isinstance(value, dict) else [_arg(v) for v in value]
    dtype = getattr(torch, value[6:], None) if isinstance(value, str) and value.startswith("torch.") else None
    return dtype if isinstance(dtype, torch.dtype) else value


class ConfigParser:
    """A validated config (plain data in .config), its run_id and resume (True: continuing a run in its directories)."""

    def __init__(self, raw: dict, overrides, registry, run_id=None, resume=False, run_dir=None):
        self.registry, self.resume = registry, resume
        self.config = with_defaults(raw)
        for item in overrides:
            apply_override(self.config, item, self._params)
        self.config = with_defaults(self.config)  # an added (+) key is still checked against the schema
        self._validate()
        if run_id is not None and not is_name(run_id):
            raise ConfigError(f"--run-id: {run_id[:80]!r} must be {A_NAME}")
        self.run_id = run_id or datetime.now().strftime("%Y%m%d_%H%M%S")
        self._run_id_given = run_id is not None
        # A resumed run writes beside its checkpoint, not in its config's save_dir, unless this command line names one.
        relocated = any(o.lstrip("+").startswith("trainer.save_dir=") for o in overrides)
        self.run_dir = Path(run_dir) if run_dir is not None and not relocated else None

    def __getitem__(self, key):
        return self.config[key]

    def resolve(self, path):  # the class or function the spec at `path` names
        value, section = get_path(self.config, path), path.removeprefix("data_loader.").split(".")[0]
        at = where(path) + (".type" if isinstance(value, dict) else "")
        return self.registry.resolve(spec_of(value)["type"], at, DEFAULT_MODULES.get(section))

    def names(self, key="metrics") -> list:
        """What each metric (or callback) is called in logs (and checkpoints): its "name", else its snake_case."""
        return [m.get("name") or snake_case(m["type"].rpartition(".")[2]) for m in map(spec_of, self.config[key])]

    metric_names = property(names)  # names("metrics")

    def _params(self, path):  # what the spec at `path` takes: settable by override without +
        try:
            return set(inspect.signature(self.resolve(path)).parameters)
        except (ConfigError, KeyError, IndexError, TypeError, ValueError):
            return set()

    def _validate(self):
        """Check everything that can be checked before building anything; raise on the first fault."""
        c, t, d = self.config, self.config["trainer"], self.config["data_loader"]
        blocks = t["fsdp_modules"]
        bounds = {key: (low, MAXIMUM.get(key, 2**31 - 1)) for key, low in MINIMUM.items()}
        checks = [  # (key path, whether its value is fine, what it must be); the types are checked already
            ("name", is_name(c["name"]), A_NAME),
            ("trainer.save_dir", t["save_dir"] and "\0" not in t["save_dir"], "a non-empty path without NUL bytes"),
            *((key, low <= get_path(c, key) <= high, f"in [{low}, {high}]") for key, (low, high) in bounds.items()),
            ("data_loader.num_workers", d["num_workers"] == "auto" or d["num_workers"] in range(1025),
             '"auto" or in [0, 1024]'),
            *((f"data_loader.{key}", 0 <= d[key] < 1, "in [0, 1)") for key in ("validation_split", "test_split")),
            ("trainer.len_epoch", t["len_epoch"] is None or t["len_epoch"] >= 1, ">= 1 or null"),
            ("trainer.amp", t["amp"] in (None, "bf16", "fp16"), '"bf16", "fp16" or null'),
            ("trainer.clip_grad_norm", t["clip_grad_norm"] is None or t["clip_grad_norm"] > 0, "> 0 or null"),
            ("trainer.verbosity", t["verbosity"] in (0, 1, 2), "0, 1 or 2"),
            ("trainer.strategy", t["strategy"] in ("ddp", "fsdp"), '"ddp" or "fsdp"'),
            ("trainer.fsdp_modules", blocks is None or blocks and all(map(is_name, blocks)),
             "null or a non-empty list of class names"),
            *((f"trainer.{key}", not t[key] or t["strategy"] == "fsdp", json.dumps(TRAINER_DEFAULTS[key][0]) +
               ' unless trainer.strategy is "fsdp"') for key in ("fsdp_modules", "activation_checkpointing"))]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}: must be {allowed}, got {json.dumps(get_path(c, key))[:80]}")
        if isinstance(t["compile"], str) and t["compile"] not in torch.compiler.list_backends(exclude_tags=()):
            raise ConfigError(f"trainer.compile: unknown backend {t['compile'][:80]!r}; available: "
                              f"{', '.join(torch.compiler.list_backends(exclude_tags=()))}")
        for path in object_paths(c):
            self._check_spec(path)
        trainer = self.resolve("trainer")
        if not (inspect.isclass(trainer) and issubclass(trainer, BaseTrainer)):
            raise ConfigError(f"trainer.type: {t['type'][:80]} is not a BaseTrainer subclass (see trainer/trainer.py)")
        reserved = [n for n in self.metric_names if n in RESERVED or n.startswith("val_")]
        if reserved:
            raise ConfigError(f'metrics: {reserved[0]!r} is a name the trainer logs itself; give it another "name"')
        for key, given in (("metrics", self.metric_names), ("callbacks", self.names("callbacks"))):
            twice = [n for n in given if given.count(n) > 1]
            if twice:
                raise ConfigError(f'{key}: two {key} are named {twice[0]!r}; give one a "name"')
        callbacks = [self.resolve(f"callbacks.{i}") for i in range(len(c["callbacks"]))]
        for i, cls in enumerate(callbacks):  # a method named on_* that is no event (a typo) would never be called
            if wrong := [m for m in dir(cls) if m.startswith("on_") and m not in EVENTS and callable(getattr(cls, m))]:
                raise ConfigError(f"callbacks[{i}]: {cls.__name__}.{wrong[0]} is not one of {', '.join(EVENTS)}")
        self.monitor = mode, metric = parse_monitor(t["monitor"], self.metric_names, callbacks)
        if (metric or "").startswith("val_") and not (d["validation_split"] or d["valid_dataset"]):
            raise ConfigError(f"trainer.monitor: {metric} needs validation data (validation_split or valid_dataset)")
        sched = c["lr_scheduler"]
        if sched is None:
            return
        sched.setdefault("interval", "epoch")
        if sched["interval"] not in ("epoch", "step"):
            raise ConfigError(f"lr_scheduler.interval: must be 'epoch' or 'step', got {str(sched['interval'])[:80]!r}")
        plateau = self.resolve("lr_scheduler") is torch.optim.lr_scheduler.ReduceLROnPlateau
        if plateau and (mode == "off" or sched["interval"] != "epoch"):
            raise ConfigError("lr_scheduler: ReduceLROnPlateau needs a trainer.monitor to step on and interval 'epoch'")
        if plateau and sched["args"].get("mode", "min") != mode:
            raise ConfigError(f"lr_scheduler.args.mode: must match trainer.monitor's {mode!r}, or the "
                              "learning rate is cut while the metric improves")

    def _check_spec(self, path):  # the spec at `path` is a name or {type, args}; it resolves and takes the args
        value, at = get_path(self.config, path), where(path)
        if isinstance(value, str):
            return self.resolve(path)
        check_type(value, dict, at)
        section = [p for p in path.split(".") if not p.isdigit()][-1]
        check_keys(value, ("type", "args", *EXTRA_KEYS.get(section, ())), at + ".")
        if "type" not in value:
            raise ConfigError(f"{at}.type: missing required key")
        check_type(value.setdefault("args", {}), dict, f"{at}.args")
        obj = self.resolve(path)
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):  # some builtins have none
            return
        chained = obj is torch.optim.lr_scheduler.ChainedScheduler  # (schedulers, optimizer=None)
        given = (None,) if path == "optimizer" or path.startswith("lr_scheduler") and not chained else ()
        given_kw = {"optimizer": None} if chained else {}
        partial = inspect.isfunction(obj) and not path.startswith(("arch", "data_loader"))  # gets the batch later
        try:
            (signature.bind_partial if partial else signature.bind)(*given, **value["args"], **given_kw)
        except TypeError as e:
            raise ConfigError(f"{at}.args: {e} (signature: {value['type']}{signature})") from None
        for name, arg in value["args"].items():  # JSON holds no function: a name given for one fails mid-run
            param = signature.parameters.get(name)
            if param is not None and takes_functions(param.annotation) and arg is not None:
                raise ConfigError(f"{at}.args.{name}: {value['type']} expects a function here, which a config cannot "
                                  f"hold (got {json.dumps(arg)[:80]}); define a class in your project instead")

    def init_obj(self, path, *args, **kwargs):
        """Build the spec at `path`: type(*args, **config args, **kwargs); runtime objects never come via config."""
        spec, at = spec_of(get_path(self.config, path)), where(path)
        overlap = set(kwargs) & set(spec["args"]) - {"schedulers"}  # a chain's specs, replaced by what they build
        if overlap:
            raise ConfigError(f"{at}.args: {', '.join(sorted(overlap))} is set by the program, not the config")
        obj = self.resolve(path)
        build = functools.partial(obj, *args, **{**{k: _arg(v) for k, v in spec["args"].items()}, **kwargs})
        try:
            weights = spec["args"].get("weights") if path == "arch" else None
            built = build_pretrained(build, obj, weights) if weights else build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{at}.args: {spec['type']} rejected {json.dumps(spec['args'])[:200]}: "
                              f"{str(e)[:300]}") from None
        except (OSError, RuntimeError, MemoryError) as e:  # a dataset's missing files; a tensor too large, or < 0
            data = path.startswith("data_loader")
            if isinstance(e, RuntimeError) and not data and not getattr(obj, "__module__", "").startswith("torch"):
                raise  # raised by the project's own code: a bug, with its traceback
            raise (DataError if data else ConfigError)(
                f"{at}: {spec['type']} failed: {str(e).strip()[:300]}{_files_hint(obj, spec)}") from None
        if path == "arch" and any(t.is_meta for t in itertools.chain(built.parameters(), built.buffers())):
            raise ConfigError(f"{at}: {spec['type']} made tensors on the meta device, which hold no values")
        return built

    def init_scheduler(self, optimizer):
        """lr_scheduler on `optimizer`; for SequentialLR and ChainedScheduler, the schedulers of its args first."""
        n = chain_length(self["lr_scheduler"])
        chain = {"schedulers": [self.init_obj(f"lr_scheduler.args.schedulers.{i}", optimizer) for i in range(n)]}
        chained = self.resolve("lr_scheduler") is torch.optim.lr_scheduler.ChainedScheduler  # (schedulers, optimizer)
        args, kwargs = ((), {"optimizer": optimizer}) if chained else ((optimizer,), {})
        return self.init_obj("lr_scheduler", *args, **kwargs, **(chain if n else {}))

    def init_ftn(self, path):  # a loss or metric: a class is built with its args, a function gets them bound
        obj, args = self.resolve(path), spec_of(get_path(self.config, path))["args"]
        if inspect.isclass(obj):
            return self.init_obj(path)
        return functools.partial(obj, **args) if args else obj

    @property
    def save_dir(self) -> Path:
        return self.run_dir or Path(self.config["trainer"]["save_dir"]) / "models" / self.config["name"] / self.run_id

    @property
    def log_dir(self) -> Path:
        """<root>/log/<name>/<run_id> beside <root>/models/<name>/<run_id>; outside that layout, the run's log/."""
        run = self.save_dir
        return run.parents[2] / "log" / run.parent.name / run.name if run.parent.parent.name == "models" \
            else run / "log"

    def make_run_dirs(self, reuse=False):
        """Create the run's directories, lock the run (another process is refused), write the resolved config there;
        the lock, to close when the run ends. A new run claims its directory by exclusive mkdir (parents too): a
        same-second id gets a suffix, a taken --run-id is an error (unless `reuse`: a run with no checkpoint yet)."""
        claimed = lock = None
        try:
            if not self.resume and not reuse:
                try:
                    claimed = claim_dir(self.save_dir, numbered=not self._run_id_given)
                except FileExistsError:
                    raise ConfigError(f"--run-id: run {self.run_id!r} already exists in {self.save_dir.parent}; "
                                      "resume it with -r or choose another id") from None
                self.run_id = claimed.name
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            lock, owner = lock_dir(self.save_dir)
            if lock is not None:
                for stale in self.save_dir.glob(".*.tmp"):  # a save a crash cut short (resumed or not)
                    restore_or_remove(stale)
                write_json(self.config, self.save_dir / "config.json")
        except OSError as e:  # e.g. a full disk: nothing left behind to block this --run-id
            if lock is not None:
                lock.close()
            if claimed is not None:
                with contextlib.suppress(OSError):  # the run directory and its log directory, if empty
                    (claimed / ".lock").unlink(missing_ok=True)
                    claimed.rmdir()
                    self.log_dir.rmdir()
            raise ConfigError(f"trainer.save_dir: cannot create {e.filename or self.save_dir}: {e.strerror}") from None
        if lock is None:
            raise ConfigError(f"{self.save_dir}: this run is being trained by another process (pid {owner}); "
                              "wait for it to end, or resume into another run with -c CONFIG -r CHECKPOINT")
        return lock


def _files_hint(cls, spec):
    """For torchvision's MNIST-style datasets: the files to put in place when they cannot be downloaded."""
    resources = getattr(cls, "resources", None) or ()
    root = Path(spec["args"].get("root", ".")) / getattr(cls, "__name__", "") / "raw"
    files = ", ".join(Path(r[0] if isinstance(r, tuple) else r).name.removesuffix(".gz") for r in resources)
    return f"; offline, put these files (uncompressed: gunzip the .gz files) in {root}: {files}" if files else ""
