"""Shared helpers: run train.py / test.py in a subprocess or in-process, read a run's outputs back.

Every run writes only under pytest's tmp_path (trainer.save_dir=<tmp>/saved).
"""
import csv
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# One intra-op thread per process, here and in every subprocess: the suite runs many small trainings
# (and DataLoader workers) on a 2-core machine, where oversubscribed threads make each step many
# times slower. Results stay deterministic; runs compared bitwise all use this same setting.
THREADS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)

NAME = "Digits_CNN"  # the name in config.json
# config.json: 1797 digits, 15% validation and 15% test -> 1257 training samples -> 40 batches of <= 32.
STEPS_PER_EPOCH = 40
N_VALID = N_TEST = 270
CSV_COLUMNS = ["epoch", "loss", "accuracy", "top_k_acc", "val_loss", "val_accuracy", "val_top_k_acc",
               "lr", "epoch_seconds", "samples_per_second"]
TIME_COLUMNS = ("epoch_seconds", "samples_per_second")


@pytest.fixture(autouse=True, scope="session")
def _in_repo_root():
    """config.json's data_loader.dataset.args.root ("data/") is relative to the repository root."""
    old = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(old)


# ---- running the scripts ----------------------------------------------------------------------

def run_script(script, *args, cwd=ROOT, timeout=300, env=THREADS_ENV):
    """`python <script> args...` in a real subprocess (script relative to the repository root, or
    absolute); returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def run_train(*args, **kwargs):
    return run_script("train.py", *args, **kwargs)


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_user_error(result, *fragments):
    """Exit status 2 and exactly one stderr line, 'error: ...', containing every fragment; no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def reset_logging():
    """main() points the root logger at the current stdout and a run's info.log: undo that, so a
    later test does not write into a closed capture stream or an old run's file."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()


def call_main(main, argv):
    """main(argv) in this process (the same code path as the script, without the start-up cost)."""
    try:
        return main([str(a) for a in argv])
    finally:
        reset_logging()


def main_error(main, argv, capsys):
    """Run main through cli.run_main as the scripts do; return (exit status, stderr) of a user error."""
    from utils.errors import run_main
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exc:
            run_main(main, [str(a) for a in argv])
    finally:
        reset_logging()
    return exc.value.code, capsys.readouterr().err


def parse_config(*overrides, config="config.json"):
    """The ConfigParser of `config` (relative to the repository root) with KEY=VALUE overrides, as the
    scripts build it; parsing writes nothing."""
    from parse_config import ConfigParser, load_config_file
    from utils.registry import Registry
    return ConfigParser(load_config_file(ROOT / config), list(overrides), Registry())


def digits_datasets(*overrides, seed=None):
    """{"train", "valid", "test"} datasets of config.json's split (seed: the config's, 1, unless given)."""
    from base.base_data_loader import make_datasets
    return make_datasets(parse_config(*overrides, *([f"seed={seed}"] if seed is not None else [])))


def train(save_dir, *overrides, run_id="run", config="config.json", extra=()):
    """Train in-process from `config` with the given KEY=VALUE overrides; returns the Run."""
    import train as train_script
    call_main(train_script.main, ["-c", config, "--run-id", run_id, *extra,
                                  f"trainer.save_dir={save_dir}", *overrides])
    return Run(Path(save_dir), run_id)


# ---- reading a run's outputs ------------------------------------------------------------------

@dataclass
class Run:
    save_dir: Path
    run_id: str
    name: str = NAME

    @property
    def model_dir(self) -> Path:
        return self.save_dir / "models" / self.name / self.run_id

    @property
    def log_dir(self) -> Path:
        return self.save_dir / "log" / self.name / self.run_id

    def checkpoint(self, file="model_best.pth") -> dict:
        return torch.load(self.model_dir / file, weights_only=True)

    def pth_files(self) -> set:
        return {p.name for p in self.model_dir.glob("*.pth")}

    def metrics(self) -> list:
        return read_csv(self.log_dir / "metrics.csv")


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_time(rows) -> list:
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def tree(path) -> set:
    """Every file and directory under `path`, relative to it."""
    path = Path(path)
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def assert_same(a, b, where="checkpoint"):
    """Exact equality of nested checkpoint data: tensors with torch.equal (and the same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


EXACT_KEYS = ("model", "optimizer", "lr_scheduler", "scaler", "trainer", "metrics", "rng", "callbacks")


def assert_same_run(a: Run, b: Run, *checkpoints):
    """Identical state in each of `checkpoints` of both runs and identical metrics.csv, time columns aside."""
    for checkpoint in checkpoints:
        ca, cb = a.checkpoint(checkpoint), b.checkpoint(checkpoint)
        for key in EXACT_KEYS:
            assert_same(ca[key], cb[key], f"{checkpoint}: {key}")
    assert without_time(a.metrics()) == without_time(b.metrics())


def make_image_folder(root, counts=(("train", 9), ("val", 2), ("test", 1)), classes=3, seed=0):
    """PNG images of random sizes (40-70 px) in root/<split>/class<c>/; class c is brighter in channel c."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in counts:
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = rng.integers(40, 71, size=2)
                pixels = rng.integers(0, 180, size=(h, w, 3), dtype=np.uint8)
                pixels[..., c] += 70
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return Path(root)


def read_json(path):
    return json.loads(Path(path).read_text())


# ---- shared runs ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The template's own command, once: `python train.py -c config.json --run-id r1 trainer.epochs=3`
    (config.json: save_period 5, monitor max val_accuracy). Tests must not write into it."""
    save_dir = tmp_path_factory.mktemp("digits") / "saved"
    result = run_train("-c", "config.json", "--run-id", "r1", "trainer.epochs=3", f"trainer.save_dir={save_dir}")
    assert_ok(result)
    run = Run(save_dir, "r1")
    run.result = result
    return run
