"""Config text and the command line: read a JSON or YAML file, apply KEY.PATH=VALUE overrides."""
import collections.abc
import difflib
import json
import types
import typing
from pathlib import Path

from utils.errors import ConfigError


MAX_BYTES, MAX_VALUES = 1_000_000, 100_000  # far beyond any real config; bounds what a hostile file costs


def load_config_file(path):
    """Parse a .json, .yaml or .yml file into a dict; errors name the file, line and column."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # bounded: `-c /dev/zero` must not fill the memory
        if len(raw) > MAX_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_BYTES} bytes; not a config")
        text = raw.decode("utf-8")
        data = _load_yaml(path, text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply; not a config") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits (Python's limit on converting them)
        raise ConfigError(f"{path}: {str(e).split(';')[0][:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    check_size(data, str(path))
    return data


def _load_yaml(path, text):
    import yaml  # only YAML configs need it
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser stopped, when it knows
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{at}: invalid YAML: {str(getattr(e, 'problem', None) or e)[:200]}") from None


def check_size(data, at):
    """ConfigError unless `data` holds at most MAX_VALUES values and MAX_BYTES characters of strings, counting
    a shared reference (a YAML alias) each time it is reached: what later code walks or quotes stays small."""
    stack, values, chars = [data], 0, 0
    while stack:
        node = stack.pop()
        values += 1
        chars += len(node) if isinstance(node, str) else 0
        if values > MAX_VALUES or chars > MAX_BYTES:
            raise ConfigError(f"{at}: more than {MAX_VALUES} values or {MAX_BYTES} characters; not a config")
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, (list, tuple)):
            stack += node


def apply_override(config, item, params):
    """Apply one `KEY.PATH=VALUE` (value read as JSON, else as a string); `+KEY.PATH=VALUE` adds a key."""
    key, equals, raw = item.partition("=")
    add, path = key.startswith("+"), key.lstrip("+").split(".")
    if not equals or not all(path):
        raise ConfigError(f"override {item[:80]!r}: expected KEY.PATH=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except ValueError as e:  # an integer of more than 4,300 digits
        raise ConfigError(f"override {key[:80]!r}: {str(e).split(';')[0][:200]}") from None
    node = config
    for i, part in enumerate(path[:-1]):
        is_index = isinstance(node, list) and part.isdigit() and int(part) < len(node)
        if add and isinstance(node, dict):
            node.setdefault(part, {})
        if not is_index and not (isinstance(node, dict) and isinstance(node.get(part), (dict, list))):
            return _unknown_key(config, ".".join(path[:i + 1]), item)
        node = node[int(part)] if is_index else node[part]
    # A constructor argument of the class a {type, args} names may be set without +.
    settable = len(path) > 1 and path[-2] == "args" and path[-1] in params(".".join(path[:-2]))
    if not isinstance(node, dict) or (path[-1] not in node and not add and not settable):
        return _unknown_key(config, ".".join(path), item)
    node[path[-1]] = value


def _unknown_key(config, key, item):
    def key_paths(tree, prefix=""):
        for k, v in tree.items() if isinstance(tree, dict) else ():
            yield prefix + k
            yield from key_paths(v, prefix + k + ".")
    close = difflib.get_close_matches(key, list(key_paths(config)))
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"override {item[:80]!r}: no key {key[:80]!r} in the config{hint} "
                      "(prefix with + to add a new key)")


def is_name(name) -> bool:
    """A single path component of 1-200 printable characters (no newline, no right-to-left override, which would
    make logs and listings lie): a run id or an experiment name."""
    return isinstance(name, str) and 0 < len(name) <= 200 and not set(name) & set("/\\\0") and \
        name not in (".", "..") and name.isprintable()


def where(path: str) -> str:
    """'metrics.1.args' -> 'metrics[1].args': how messages name a key path."""
    return "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split(".")).lstrip(".")


def get_path(node, path: str):
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def check_keys(section, schema, prefix):
    """No key of `section` outside `schema`; else an error naming it and its close matches."""
    if unknown := [k for k in section if k not in schema]:
        close = [prefix + k for k in difflib.get_close_matches(unknown[0], list(schema))]
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(schema)}"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key{hint}")


def check_type(value, types, at):
    types = types if isinstance(types, tuple) else (types,)
    accepted = types + (int,) if float in types else types  # 3 is a fine float
    # bool is an int in Python, but `epochs: true` is a mistake, not 1 epoch.
    if not isinstance(value, accepted) or isinstance(value, bool) and bool not in types:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ConfigError(f"{at}: expected {names}, got {json.dumps(value, default=str)[:80]}")


def spec_of(value) -> dict:
    """A {type, args} spec from a spec or a bare name."""
    return {"type": value, "args": {}} if isinstance(value, str) else value


def object_paths(config):
    """The key path of every {type, args} (or bare name) the config asks to build."""
    paths = ["arch", "optimizer", "loss"]
    paths += [f"{key}.{i}" for key in ("metrics", "callbacks") for i in range(len(config[key]))]
    if config["lr_scheduler"] is not None:  # SequentialLR and ChainedScheduler: their schedulers first
        chain = [f"lr_scheduler.args.schedulers.{i}" for i in range(chain_length(config["lr_scheduler"]))]
        paths += [*chain, "lr_scheduler"]
    data = config["data_loader"]
    paths += [f"data_loader.{k}" for k in ("dataset", "valid_dataset", "test_dataset") if data[k] is not None]
    return paths + [f"data_loader.{k}.{i}" for k in ("train_transform", "eval_transform") for i in range(len(data[k]))]


def chain_length(sched) -> int:
    """How many specs (SequentialLR's, ChainedScheduler's schedulers) lr_scheduler.args.schedulers lists to build."""
    args = sched.get("args")  # not checked yet: _check_spec comes after
    inner = args.get("schedulers") if isinstance(args, dict) else None
    return len(inner) if isinstance(inner, list) and all(isinstance(s, (str, dict)) for s in inner) else 0


def takes_functions(annotation) -> bool:
    """True for a parameter annotated as taking a function (or None) and nothing else: no string, no number."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = typing.get_args(annotation) if union else (annotation,)
    return all(k is type(None) or typing.get_origin(k) is collections.abc.Callable for k in kinds)
