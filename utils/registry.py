"""The names a config may use: what the project's own packages define, and, by dotted name, what an
allowlist of modules holds: well-known ones, and those the project lists in allowed_modules.txt. Never an
arbitrary import, a private or dunder name."""
import difflib
import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path

from utils.errors import ConfigError

PROJECT_PACKAGES = ("model", "data_loader", "trainer", "callbacks")
ALLOWED_MODULES = ("torch.nn", "torch.optim", "torch.optim.lr_scheduler", "torchvision.models",
                   "torchvision.datasets", "torchvision.transforms.v2")
PROJECT_MODULES = Path(__file__).resolve().parents[1] / "allowed_modules.txt"  # the project's own additions
REFUSED = {"torch.optim.LBFGS": "it needs a closure that re-evaluates the loss, which this Trainer does not pass",
           "torch.optim.Optimizer": "it is the abstract base class",
           "torch.optim.lr_scheduler.LRScheduler": "it is the abstract base class"}


class Registry:
    """Resolves config names. Bare names: a public class or function defined in any file of the
    project's packages, else in the section's `default` module (e.g. torch.optim for optimizers)."""

    def __init__(self, packages=PROJECT_PACKAGES, modules_file=PROJECT_MODULES):
        self.own, self.where, self.allowed = {}, {}, ALLOWED_MODULES + project_modules(modules_file)
        for package in filter(importlib.util.find_spec, packages):  # a project may have deleted one
            for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
                module = importlib.import_module(f"{package}.{info.name}")
                for name, obj in vars(module).items():
                    if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "") == module.__name__:
                        self.where.setdefault(name, []).append(f"{package}/{info.name}.py")
                        self.own[name] = obj

    def resolve(self, name, where, default=None):
        """The object `name` refers to, or a ConfigError saying what exists and how to add a name."""
        if not isinstance(name, str) or not name or any(p.startswith("_") for p in name.split(".")):
            raise self._unknown(name, where, default)
        if "." not in name:
            if len(self.where.get(name, ())) > 1:
                raise ConfigError(f"{where}: {name!r} is defined in both {' and '.join(self.where[name])}; rename one")
            if name in self.own:
                return self.own[name]
            name = f"{default}.{name}" if default else name
        module, _, attr = name.rpartition(".")
        if module not in self.allowed:
            raise self._unknown(name, where, default)
        if name in REFUSED:
            raise ConfigError(f"{where}: {name} is not supported: {REFUSED[name]}")
        try:
            obj = getattr(importlib.import_module(module), attr, None)
        except ImportError as e:  # a module of allowed_modules.txt that is not installed
            raise ConfigError(f"{where}: cannot import {module} (listed in {PROJECT_MODULES.name}): {e}") from None
        # only what the module itself provides, not a helper it imported (functools.wraps, typing.cast)
        if not callable(obj) or inspect.ismodule(obj) or not getattr(obj, "__module__", "").startswith(module):
            raise self._unknown(name, where, default, module)
        return obj

    def _unknown(self, name, where, default, module=None):
        shown = repr(name)[:80]
        if module:  # a dotted name in an allowed module: suggest its close matches
            mod = importlib.import_module(module)
            names = [n for n in dir(mod) if not n.startswith("_")
                     and str(getattr(getattr(mod, n), "__module__", "")).startswith(module)]
            close = difflib.get_close_matches(name.rpartition(".")[2], names, n=3)
            hint = f"did you mean {' or '.join(f'{module}.{c}' for c in close)}?" if close else f"see {module}"
            return ConfigError(f"{where}: unknown name {shown}; {hint}")
        close = difflib.get_close_matches(str(name), list(self.own), n=1)
        available = ", ".join(sorted(self.own)) + (f", any {default} name" if default else "")
        return ConfigError(f"{where}: unknown name {shown}; " + (f"did you mean {close[0]}? " if close else "")
                           + f"available: {available}, or a dotted name in {', '.join(self.allowed)}; to add your "
                           f"own, define it in any file under {'/ or '.join(PROJECT_PACKAGES)}/")


def project_modules(path) -> tuple:
    """The module names listed in `path` (one a line; # starts a comment); () if there is no such file."""
    if not Path(path).is_file():
        return ()
    names = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    for number, name in enumerate(names, 1):
        if name and not re.fullmatch(r"[A-Za-z]\w*(\.[A-Za-z]\w*)*", name):
            raise ConfigError(f"{path.name}:{number}: {name[:80]!r} is not a module name")
    return tuple(filter(None, names))
