"""What the programs build alike: the loss, metrics and callbacks a config names, and a trained run loaded back
(test.py, export.py, predict.py): its config, its model with the chosen weights, the Trainer class it trained
with; or an exported model (model.ts, model.pt2, model.onnx from export.py) with its model.json."""
import hashlib
import json
import pickle
import warnings
import zipfile
from collections import namedtuple
from pathlib import Path

import torch

from base.base_metric import metric_object
from parse_config import ConfigParser
from utils.checkpoint import find_checkpoint, load_checkpoint, load_model_state, model_weights
from utils.errors import ConfigError, DataError
from utils.registry import Registry
from utils.util import prepare_device, weights_only_loads

Run = namedtuple("Run", "config path checkpoint model trainer device")


def build_loss_and_metrics(config, device):
    """The loss (a module is moved to `device`) and {name: metric} (functions wrapped as batch means)."""
    criterion = config.init_ftn("loss")
    if not callable(criterion):
        raise ConfigError(f"loss: {type(criterion).__name__} is not callable as loss(output, target)")
    criterion = criterion.to(device) if isinstance(criterion, torch.nn.Module) else criterion
    return criterion, {name: metric_object(config.init_ftn(f"metrics.{i}")) for i, name in enumerate(config.names())}


def build_callbacks(config) -> dict:
    """{name: callback} of the config's callbacks (ConfigParser checked their methods' names)."""
    return {name: config.init_obj(f"callbacks.{i}") for i, name in enumerate(config.names("callbacks"))}


def load_run(resume, overrides=(), weights="model", device=None, logger=None) -> Run:
    """The run of checkpoint `resume` (or of a run directory: its newest), on `device` (default: as the config
    asks), with its model in eval mode holding `weights` ("model", or a callback's, e.g. "ema")."""
    path = find_checkpoint(resume)
    checkpoint = load_checkpoint(path)
    config = ConfigParser(checkpoint["config"], list(overrides), Registry(), run_id=checkpoint["run_id"], resume=True)
    device = device or prepare_device(config["n_gpu"], logger)
    model = config.init_obj("arch")
    load_model_state(model, model_weights(checkpoint, path, weights), path, checkpoint["arch"])
    model = model.to(device).eval()
    criterion, metrics = build_loss_and_metrics(config, device)
    trainer = config.resolve("trainer")(model, criterion, metrics, None, config, device)
    return Run(config, path, checkpoint, model, trainer, device)


ARTIFACTS = (".ts", ".pt2", ".onnx")  # what export.py writes: TorchScript, torch.export, ONNX


def load_exported(path, device="cpu"):
    """An exported model loaded back, as a function of an input batch (export.py verifies it, predict.py runs it)."""
    if path.suffix == ".ts":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still widely loaded
            return torch.jit.load(str(path), map_location=device)
    if path.suffix == ".pt2":  # torch.export.load unpickles with weights_only=False: every pickle must pass True
        from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX
        with zipfile.ZipFile(path) as archive:  # objects that only plain pickle (or TorchScript) loads: refused
            if any(Path(n).name.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX))
                   for n in archive.namelist()):
                raise pickle.UnpicklingError("it holds custom objects, which only plain pickle loads")
        with weights_only_loads():
            return torch.export.load(str(path)).module().to(device)
    import onnxruntime  # the CPU build the README's set-up installs: outputs come back on the CPU
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    dtype = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64"}.get(inputs[0].type) if len(inputs) == 1 else None
    if dtype is None or inputs[0].name != "input":
        raise ValueError(f"its inputs are {[(i.name, i.type) for i in inputs]}, not one tensor named 'input'")
    return lambda x: torch.from_numpy(session.run(None, {"input": x.cpu().numpy().astype(dtype)})[0])


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_artifact(path, logger=None):
    """(config, device, function of an input batch, model.json's content) of an exported model that the
    model.json beside it vouches for: listed with its checksum, and verified against the eager model."""
    info_file = path.with_name("model.json")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        info = json.loads(info_file.read_text())
        entry = next((e for e in info["formats"].values() if e["file"] == path.name), {})
        if not (isinstance(info["config"], dict) and isinstance(info.get("run_id"), (str, type(None)))):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{info_file}: missing, or not one export.py wrote; run export.py on the checkpoint again") \
            from None
    if entry.get("sha256") != file_sha256(path):
        raise DataError(f"{path}: not the file {info_file.name} vouches for (another export's, or changed since: "
                        "its checksum differs); run export.py on the checkpoint again")
    if entry.get("verified") is not True:
        raise DataError(f"{path}: failed export.py's check (max |exported - eager| {entry.get('max_abs_diff')} > "
                        f"{info.get('tolerance')}); export with a larger --tolerance, or predict with the checkpoint")
    config = ConfigParser(info["config"], [], Registry(), run_id=info.get("run_id"), resume=True)
    device = prepare_device(config["n_gpu"], logger)
    try:
        return config, device, load_exported(path, device), info
    except Exception as e:  # noqa: BLE001 - a refused pickle, a garbage or truncated file: the file is at fault
        what = "refused: it could run code" if isinstance(e, pickle.UnpicklingError) else "not loadable"
        raise DataError(f"{path}: {what} ({' '.join(str(e).split())[:200]}); export it again") from None
