"""test.py, new_project.py, and how runs are named."""
import copy
import json
import shutil
from datetime import datetime

import pytest
import torch
import torch.nn.functional as F

import test as test_script
from conftest import (N_TEST, ROOT, assert_ok, call_main, main_error, read_json, run_script, tree)
from base.base_data_loader import make_datasets, split_indices
from data_loader.datasets import DigitsDataset
from model.model import DigitsModel
from parse_config import ConfigParser
from utils.errors import ConfigError
from utils.registry import Registry

BASE = json.loads((ROOT / "config.json").read_text())
REGISTRY = Registry()


def new_parser(overrides=(), **kwargs):
    return ConfigParser(copy.deepcopy(BASE), list(overrides), REGISTRY, **kwargs)


# ---- test.py ----------------------------------------------------------------------------------

@pytest.fixture
def run_copy(digits_run, tmp_path):
    """A copy of the shared run's outputs that a test may write into."""
    shutil.copytree(digits_run.save_dir, tmp_path / "saved")
    return tmp_path / "saved" / "models" / "Digits_CNN" / "r1"


def printed_json(stdout):
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):lines.index("}") + 1]))


def test_test_script_evaluates_the_checkpoint_on_the_test_split(digits_run, run_copy):
    checkpoint = run_copy / "model_best.pth"
    saved = run_copy.parent.parent.parent
    before, original = tree(saved), tree(digits_run.save_dir)
    result = run_script("test.py", "-r", checkpoint)
    assert_ok(result)

    # test_metrics.json beside the checkpoint, and no run directory anywhere
    assert tree(saved) == before | {"models/Digits_CNN/r1/test_metrics.json"}
    assert tree(digits_run.save_dir) == original
    written = read_json(run_copy / "test_metrics.json")
    printed = printed_json(result.stdout)
    assert written["checkpoint"] == "model_best.pth"
    assert written["n_samples"] == printed["n_samples"] == N_TEST
    for key in ("loss", "accuracy", "top_k_acc"):
        assert written[key] == printed[key]

    # the numbers are the checkpoint's model on the held-out test split: the 15% of the digits
    # (seed 1) that are in neither the training nor the validation split
    saved = torch.load(checkpoint, weights_only=True)
    model = DigitsModel()
    model.load_state_dict(saved["model"])
    model.eval()
    images, labels = DigitsDataset("data/").tensors
    valid_idx, test_idx, train_idx = split_indices(len(labels), [0.15, 0.15], seed=1)
    assert len(test_idx) == N_TEST and len(valid_idx) + len(test_idx) + len(train_idx) == len(labels)
    assert len(set(test_idx.tolist()) | set(valid_idx.tolist()) | set(train_idx.tolist())) == len(labels)  # disjoint
    x, y = images[test_idx], labels[test_idx]
    splits = make_datasets(ConfigParser(saved["config"], [], REGISTRY, resume=True))  # what test.py evaluates
    assert all(torch.equal(a, b) for a, b in zip(splits["test"].tensors, (x, y)))
    with torch.no_grad():
        out = model(x).double()
    assert written["loss"] == pytest.approx(F.nll_loss(out, y).item(), rel=1e-5)
    assert written["accuracy"] == pytest.approx((out.argmax(1) == y).double().mean().item(), abs=1e-6)


def test_test_script_takes_a_run_directory(run_copy):
    results = call_main(test_script.main, ["-r", run_copy])
    assert read_json(run_copy / "test_metrics.json")["checkpoint"] == "checkpoint-epoch3.pth"
    assert results["n_samples"] == N_TEST


def test_test_script_refuses_an_empty_test_split(run_copy, capsys):
    code, err = main_error(test_script.main, ["-r", run_copy / "model_best.pth", "data_loader.test_split=0"],
                           capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: data_loader") and "test_split" in err, err
    assert not (run_copy / "test_metrics.json").exists()


def test_empty_sampler_yields_no_batches():
    from base.base_data_loader import EpochBatchSampler
    sampler = EpochBatchSampler(0, 32, shuffle=True)
    assert len(sampler) == 0
    assert list(sampler) == []


# ---- new_project.py ---------------------------------------------------------------------------

def test_new_project_leaves_out_outputs_and_caches(tmp_path):
    """A template tree with every kind of clutter in it, copied by its own new_project.py."""
    template = tmp_path / "template"
    files = ["new_project.py", "train.py", "config.json", "data/digits.csv.gz", "model/model.py",
             "saved/models/x/config.json", "saved/log/x/info.log", ".git/HEAD", "__pycache__/train.cpython-311.pyc",
             "model/__pycache__/model.cpython-311.pyc", "stray.pyc", "data/MNIST/raw/train.gz", ".pytest_cache/x"]
    for name in files:
        (template / name).parent.mkdir(parents=True, exist_ok=True)
        (template / name).write_text("x")
    shutil.copy(ROOT / "new_project.py", template / "new_project.py")
    result = run_script(template / "new_project.py", tmp_path / "MyProject")
    assert_ok(result)
    assert tree(tmp_path / "MyProject") == {"new_project.py", "train.py", "config.json", "data", "data/digits.csv.gz",
                                            "model", "model/model.py"}
    # an existing directory is not overwritten
    again = run_script(template / "new_project.py", tmp_path / "MyProject")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_new_project_from_this_template_runs(tmp_path):
    target = tmp_path / "MyProject"
    assert_ok(run_script("new_project.py", target))
    copied = tree(target)
    for name in ("train.py", "test.py", "parse_config.py", "config.json", "data/digits.csv.gz", "model/model.py",
                 "data_loader/datasets.py", "trainer/trainer.py", "base/base_trainer.py", "base/base_data_loader.py",
                 "utils/registry.py", "tests/conftest.py"):
        assert name in copied
    assert not [p for p in copied if {"saved", ".git", "__pycache__"} & set(p.split("/")) or p.endswith(".pyc")]
    result = run_script(target / "train.py", "-c", "config.json", "--dry-run", f"trainer.save_dir={tmp_path / 'saved'}",
                        cwd=target)
    assert_ok(result)
    assert not (tmp_path / "saved").exists()


# ---- run ids ----------------------------------------------------------------------------------

def test_run_id_option_names_the_run(digits_run):
    assert digits_run.model_dir.name == digits_run.log_dir.name == "r1"
    assert digits_run.checkpoint("checkpoint-epoch3.pth")["run_id"] == "r1"


def test_default_run_id_contains_the_year():
    years = {str(datetime.now().year)}
    run_id = new_parser().run_id
    years.add(str(datetime.now().year))
    assert any(year in run_id for year in years)


def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path):
    overrides = [f"trainer.save_dir={tmp_path / 'saved'}"]
    first = new_parser(overrides)
    second = new_parser(overrides)
    second.run_id = first.run_id  # as if both started in the same second
    first.make_run_dirs()
    second.make_run_dirs()
    assert second.run_id != first.run_id
    assert second.save_dir != first.save_dir and second.log_dir != first.log_dir
    for parser in (first, second):
        assert (parser.save_dir / "config.json").is_file() and parser.log_dir.is_dir()
        assert parser.save_dir.name == parser.log_dir.name == parser.run_id


def test_a_taken_run_id_is_an_error_and_the_run_is_left_alone(tmp_path):
    overrides = [f"trainer.save_dir={tmp_path / 'saved'}"]
    first = new_parser(overrides, run_id="mine")
    first.make_run_dirs()
    config_bytes = (first.save_dir / "config.json").read_bytes()
    second = new_parser(overrides + ["trainer.epochs=3"], run_id="mine")
    with pytest.raises(ConfigError, match="--run-id"):
        second.make_run_dirs()
    assert (first.save_dir / "config.json").read_bytes() == config_bytes
    assert tree(tmp_path / "saved" / "models" / "Digits_CNN") == {"mine", "mine/config.json", "mine/.lock"}
