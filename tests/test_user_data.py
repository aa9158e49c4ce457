"""A user's own data and models in a copy of the template: tabular data, dict samples with their own
step, torchvision models and datasets by dotted name, transforms that stay out of evaluation, and
library logging that stays quiet."""
import contextlib
import io
import json
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, Run, assert_ok, call_main, make_image_folder, read_csv, read_json, run_script

TABULAR_DATA = '''
import logging

import torch
from torch.utils.data import Dataset


class TabularDataset(Dataset):
    """n rows of 20 float features; the label (0, 1 or 2) is a fixed linear rule of the features."""

    def __init__(self, n=300, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 20, generator=g)
        self.y = (self.x[:, :3] @ torch.tensor([1.0, -1.0, 0.5]) > 0).long() + (self.x[:, 3] > 1).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class NoisyTabular(TabularDataset):
    """Logs like a chatty third-party library on every sample."""

    def __getitem__(self, i):
        logging.getLogger("PIL.fake").debug("NOISE from a library")
        logging.getLogger("PIL.fake").warning("WARN-SHOWN from a library")
        return super().__getitem__(i)


class AddThousand:
    """A training augmentation that changes every value: adds 1000 to the features."""

    def __call__(self, sample):
        x, y = sample
        return x + 1000, y
'''

MLP = '''
import torch.nn as nn

from base import BaseModel


class MLP(BaseModel):
    def __init__(self, in_features=20, hidden=32, num_classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)
'''

CRASHING_MODEL = '''
import torch.nn as nn

from base import BaseModel


class CrashingMLP(BaseModel):
    """A model with a bug that shows on its third batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("a bug in forward")
        return self.fc(x)
'''

DICT_DATA = '''
import torch
from torch.utils.data import Dataset


class DictDataset(Dataset):
    def __init__(self, n=200, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 20, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": int(self.y[i])}
'''

DICT_TRAINER = '''
from base import BaseTrainer


class Trainer(BaseTrainer):
    def step(self, batch):
        output = self.model(batch["x"])
        return self.criterion(output, batch["y"]), output, batch["y"]
'''


def tabular_config(save_dir, **changes):
    config = {
        "name": "Tabular_MLP",
        "seed": 3,
        "n_gpu": 0,
        "arch": {"type": "MLP", "args": {"in_features": 20, "num_classes": 3}},
        "data_loader": {"dataset": {"type": "TabularDataset", "args": {"n": 300}},
                        "validation_split": 0.2, "test_split": 0.2, "batch_size": 32},
        "optimizer": {"type": "Adam", "args": {"lr": 0.01}},
        "loss": "cross_entropy",
        "metrics": ["accuracy", "MacroF1"],
        "trainer": {"epochs": 2, "save_dir": str(save_dir), "monitor": "max val_accuracy", "verbosity": 1},
    }
    for key, value in changes.items():
        config[key] = value
    return config


def new_project(path, files: dict) -> Path:
    """A copy of the template made by new_project.py, with `files` (relative path: text) written into it."""
    assert_ok(run_script("new_project.py", path))
    for name, text in files.items():
        (path / name).write_text(textwrap.dedent(text))
    return path


def run_in(project, script, *args, timeout=300):
    """`python <project>/<script> args...` with the project as working directory."""
    return run_script(project / script, *args, cwd=project, timeout=timeout)


def write_config(project, name, config):
    (project / name).write_text(json.dumps(config, indent=2))
    return name


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    base = tmp_path_factory.mktemp("tabular")
    return new_project(base / "proj", {"data_loader/tabular.py": TABULAR_DATA, "model/mlp.py": MLP,
                                       "model/crashing.py": CRASHING_MODEL})


@pytest.fixture(scope="module")
def tabular_run(tabular):
    """2 epochs of the MLP on the tabular data, TensorBoard on (the default)."""
    save_dir = tabular.parent / "saved"
    config = write_config(tabular, "tabular.json", tabular_config(save_dir))
    result = run_in(tabular, "train.py", "-c", config, "--run-id", "t")
    assert_ok(result)
    run = Run(save_dir, "t", name="Tabular_MLP")
    run.result = result
    return run


def event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_tabular_mlp_trains_with_tensorboard_and_no_images(tabular_run):
    assert "Data: 180 training, 60 validation samples" in tabular_run.result.stdout
    rows = tabular_run.metrics()
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "accuracy", "macro_f1", "val_loss", "val_accuracy", "val_macro_f1"} <= set(rows[0])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert list(tabular_run.log_dir.glob("events.out.tfevents.*"))
    tags = event_accumulator(tabular_run.log_dir).Tags()
    assert tags["images"] == []  # (N, 20) inputs are not images
    assert {"loss/train", "accuracy/train", "macro_f1/train", "loss/valid", "accuracy/valid", "macro_f1/valid",
            "loss/train_step"} <= set(tags["scalars"])
    steps = [e.step for e in event_accumulator(tabular_run.log_dir).Scalars("accuracy/valid")]
    assert steps == [6, 12]  # x axis: the global step (180 samples / 32 = 6 steps per epoch)
    assert "Traceback" not in tabular_run.result.stdout + tabular_run.result.stderr


def test_tabular_test_script_on_model_best(tabular, tabular_run):
    result = run_in(tabular, "test.py", "-r", tabular_run.model_dir / "model_best.pth")
    assert_ok(result)
    out = read_json(tabular_run.model_dir / "test_metrics.json")
    assert out["checkpoint"] == "model_best.pth" and out["n_samples"] == 60
    assert {"loss", "accuracy", "macro_f1"} <= set(out)
    assert 0 <= out["accuracy"] <= 1 and np.isfinite(out["loss"])


def test_predict_on_feature_rows_of_a_csv(tabular, tabular_run, tmp_path):
    """Tabular features in a CSV with a header: one prediction per row, the MLP's own."""
    x = torch.randn(7, 20, generator=torch.Generator().manual_seed(5))
    np.savetxt(tmp_path / "rows.csv", x.numpy(), delimiter=",", header=",".join(f"f{i}" for i in range(20)),
               comments="")
    result = run_in(tabular, "predict.py", "-r", tabular_run.model_dir / "model_best.pth", tmp_path / "rows.csv",
                    "-o", tmp_path / "p.csv")
    assert_ok(result)
    rows = read_csv(tmp_path / "p.csv")
    namespace = {}
    exec(MLP, namespace)  # the project's model/mlp.py
    mlp = namespace["MLP"]()
    mlp.load_state_dict(tabular_run.checkpoint()["model"])
    with torch.no_grad():  # the CSV holds the values as text: float32 round trip within 1e-6
        probs = mlp(torch.from_numpy(np.loadtxt(tmp_path / "rows.csv", delimiter=",", skiprows=1)).float()).softmax(1)
    assert [r["input"] for r in rows] == [f"{tmp_path / 'rows.csv'}[{i}]" for i in range(7)]
    assert [r["predicted"] for r in rows] == [str(int(i)) for i in probs.argmax(1)]
    assert np.allclose([float(r["probability"]) for r in rows], probs.max(1).values, atol=1e-6)


def test_training_augmentation_never_reaches_validation(tabular, tmp_path):
    """With lr 0 the model never changes, so validation numbers depend only on the validation data:
    a train_transform adding 1000 to every feature must leave them bitwise as they are without it,
    while it does change the training loss (it is applied there)."""
    rows = {}
    for label, transforms in (("plain", []), ("augmented", [{"type": "AddThousand"}])):
        config = tabular_config(tmp_path / "saved", optimizer={"type": "Adam", "args": {"lr": 0.0}})
        config["data_loader"]["train_transform"] = transforms
        config["trainer"].update(epochs=1, tensorboard=False)
        name = write_config(tabular, f"{label}.json", config)
        assert_ok(run_in(tabular, "train.py", "-c", name, "--run-id", label))
        (row,) = Run(tmp_path / "saved", label, name="Tabular_MLP").metrics()
        rows[label] = row
    for key in ("val_loss", "val_accuracy", "val_macro_f1"):
        assert rows["plain"][key] == rows["augmented"][key], key
    assert float(rows["augmented"]["loss"]) > 10 * float(rows["plain"]["loss"])


def test_make_datasets_applies_eval_transforms_only_to_valid_and_test():
    """Unit level, on the template's digits: train_transform shifts by +1000 (Normalize with mean
    -1000), eval_transform by -1 (mean 1); validation and test samples are the raw samples shifted
    by -1 only, training samples by +1000 only."""
    from base.base_data_loader import make_datasets, split_indices
    from data_loader.datasets import DigitsDataset
    from parse_config import ConfigParser, load_config_file
    from utils.registry import Registry

    raw = load_config_file(ROOT / "config.json")
    raw["data_loader"]["train_transform"] = [{"type": "Normalize", "args": {"mean": [-1000.0], "std": [1.0]}}]
    raw["data_loader"]["eval_transform"] = [{"type": "Normalize", "args": {"mean": [1.0], "std": [1.0]}}]
    sets = make_datasets(ConfigParser(raw, [], Registry()))
    data = DigitsDataset(str(ROOT / "data"))
    valid_idx, test_idx, train_idx = split_indices(len(data), [0.15, 0.15], raw["seed"])
    for phase, idx, shift in (("valid", valid_idx, -1.0), ("test", test_idx, -1.0)):
        for j in (0, 5, len(idx) - 1):
            image, label = sets[phase][j]
            raw_image, raw_label = data[int(idx[j])]
            assert torch.equal(image, raw_image + shift) and int(label) == int(raw_label), (phase, j)
    for j in (0, 7):
        image, label = sets["train"][(0, j)]  # training samples are keyed (epoch, index)
        raw_image, raw_label = data[int(train_idx[j])]
        assert torch.equal(image, raw_image + 1000.0) and int(label) == int(raw_label)


def test_library_debug_logs_stay_off_the_console(tabular, tmp_path):
    """A dataset that logs through a third-party logger (PIL.*): its DEBUG lines never reach the
    console even at verbosity 2; its warnings do; the template's own debug lines still show."""
    config = tabular_config(tmp_path / "unused", data_loader={
        "dataset": {"type": "NoisyTabular", "args": {"n": 120}}, "validation_split": 0.2, "batch_size": 16})
    config["trainer"].update(verbosity=2, log_step=1)
    name = write_config(tabular, "noisy.json", config)
    result = run_in(tabular, "train.py", "-c", name, "--dry-run")
    assert_ok(result)
    out = result.stdout + result.stderr
    assert "NOISE" not in out
    assert "WARN-SHOWN from a library" in out
    assert "Train epoch 1 [1/" in result.stdout  # the template's DEBUG line, at verbosity 2
    assert not (tmp_path / "unused").exists()  # a dry run writes nothing


def test_a_bug_in_the_users_model_with_workers_exits_with_its_traceback(tabular, tmp_path):
    """An exception in the user's code mid-epoch, with DataLoader workers running: train.py prints
    the traceback and exits; it must not hang on its workers at exit (a batch job would sit idle
    until its time limit)."""
    config = tabular_config(tmp_path / "saved", arch={"type": "CrashingMLP", "args": {}})
    config["data_loader"]["num_workers"] = 2
    config["trainer"]["tensorboard"] = False
    name = write_config(tabular, "crashing.json", config)
    try:
        result = run_in(tabular, "train.py", "-c", name, timeout=45)  # it fails within seconds
    except subprocess.TimeoutExpired:
        pytest.fail("train.py was still running 45 s after an exception in training with num_workers=2")
    assert result.returncode == 1, result.stderr
    assert "RuntimeError: a bug in forward" in result.stderr
    assert "Training failed" in result.stdout + result.stderr


def test_dict_samples_with_the_users_own_step(tmp_path):
    """Samples {"x": features, "y": label}, and trainer/trainer.py rewritten with a step reading
    them: training and test.py both run through that step."""
    project = new_project(tmp_path / "proj", {"data_loader/dict_data.py": DICT_DATA, "model/mlp.py": MLP,
                                              "trainer/trainer.py": DICT_TRAINER})
    config = tabular_config(tmp_path / "saved", arch={"type": "MLP", "args": {"num_classes": 2}})
    config["data_loader"]["dataset"] = {"type": "DictDataset", "args": {"n": 200}}
    name = write_config(project, "dict.json", config)
    assert_ok(run_in(project, "train.py", "-c", name, "--run-id", "d"))
    run = Run(tmp_path / "saved", "d", name="Tabular_MLP")
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(np.isfinite(float(r["val_loss"])) for r in rows)
    assert float(rows[-1]["val_accuracy"]) > 0.6  # a 1-feature threshold rule is learnt quickly
    result = run_in(project, "test.py", "-r", run.model_dir / "model_best.pth")
    assert_ok(result)
    out = read_json(run.model_dir / "test_metrics.json")
    assert out["n_samples"] == 40 and np.isfinite(out["loss"])
    # predict.py on the test split goes through the same step
    result = run_in(project, "predict.py", "-r", run.model_dir / "model_best.pth")
    assert_ok(result)
    rows = read_csv(run.model_dir / "predictions.csv")
    assert len(rows) == 40 and {r["target"] for r in rows} == {"0", "1"}
    assert np.mean([r["predicted"] == r["target"] for r in rows]) == pytest.approx(out["accuracy"])


# ---- torchvision models and datasets by dotted name -------------------------------------------

def image_folder_args(root, save_dir):
    return [f"trainer.save_dir={save_dir}", f"data_loader.dataset.args.root={root / 'train'}",
            f"data_loader.valid_dataset.args.root={root / 'val'}", f"data_loader.test_dataset.args.root={root / 'test'}",
            "arch.args.num_classes=3", "data_loader.batch_size=8", "trainer.epochs=1", "trainer.verbosity=1",
            "data_loader.num_workers=0"]


def in_process(script, *argv):
    """train.py's or test.py's main in this process (the scripts' code path without the interpreter
    start-up, which costs more than these runs): (its return value, its console output)."""
    import test as test_script
    import train as train_script
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        value = call_main({"train.py": train_script, "test.py": test_script}[script].main, [str(a) for a in argv])
    return value, out.getvalue()


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """configs/image_folder.json as shipped (torchvision.models.resnet18, torch.nn.CrossEntropyLoss
    with label smoothing, 64 px crops, TensorBoard on) for 1 epoch on a tiny image folder."""
    base = tmp_path_factory.mktemp("images")
    root = make_image_folder(base / "images", counts=(("train", 8), ("val", 8), ("test", 8)))
    _, out = in_process("train.py", "-c", "configs/image_folder.json", "--run-id", "i",
                        *image_folder_args(root, base / "saved"))
    run = Run(base / "saved", "i", name="ImageFolder_ResNet18")
    run.out, run.root = out, root
    return run


def test_torchvision_model_and_image_folder_train_resume_and_test(resnet_run):
    assert "Data: 24 training, 24 validation samples" in resnet_run.out
    checkpoint = resnet_run.checkpoint("checkpoint-epoch1.pth")
    assert checkpoint["arch"] == "ResNet" and checkpoint["model"]["fc.weight"].shape == (3, 512)
    assert checkpoint["config"]["loss"] == {"type": "torch.nn.CrossEntropyLoss", "args": {"label_smoothing": 0.1}}
    assert "inputs/train" in event_accumulator(resnet_run.log_dir).Tags()["images"]  # image batches are logged
    # continue the same run to 2 epochs
    _, out = in_process("train.py", "-r", resnet_run.model_dir, "trainer.epochs=2")
    assert "Resumed from" in out
    rows = resnet_run.metrics()
    assert [r["epoch"] for r in rows] == ["1", "2"] and "val_macro_f1" in rows[0]
    assert resnet_run.checkpoint("checkpoint-epoch2.pth")["trainer"]["epoch"] == 2
    results, _ = in_process("test.py", "-r", resnet_run.model_dir / "checkpoint-epoch2.pth")
    out = read_json(resnet_run.model_dir / "test_metrics.json")
    assert out["n_samples"] == 24 and {"loss", "accuracy", "macro_f1"} <= set(out)
    assert results["loss"] == out["loss"] and np.isfinite(out["loss"])


def test_predict_names_image_folder_classes_and_files(resnet_run, tmp_path):
    """predict.py on an image folder and on the test split: the folder names as classes, files as inputs."""
    import predict
    checkpoint = resnet_run.model_dir / "checkpoint-epoch1.pth"
    call_main(predict.main, ["-r", checkpoint, resnet_run.root / "val", "-o", tmp_path / "val.csv", "--top-k", "3"])
    rows = read_csv(tmp_path / "val.csv")
    assert [r["input"] for r in rows] == sorted(str(f) for f in (resnet_run.root / "val").rglob("*.png"))
    assert all(r["predicted"] in ("class0", "class1", "class2") and len(r["top_k"].split("; ")) == 3 for r in rows)
    assert all(abs(sum(float(k.split(":")[1]) for k in r["top_k"].split("; ")) - 1) < 1e-3 for r in rows)
    call_main(predict.main, ["-r", checkpoint, "-o", tmp_path / "test.csv"])
    rows = read_csv(tmp_path / "test.csv")
    assert len(rows) == 24 and all(Path(r["input"]).parent.name == r["target"] for r in rows)


def test_loss_class_by_dotted_name_gets_its_args():
    from parse_config import ConfigParser, load_config_file
    from utils.registry import Registry

    config = ConfigParser(load_config_file(ROOT / "configs/image_folder.json"), ["arch.args.num_classes=3"], Registry())
    loss = config.init_ftn("loss")
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    model = config.init_obj("arch")
    assert model.fc.out_features == 3


def test_absent_optional_valid_folder_falls_back_to_validation_split(tmp_path):
    """Only train/ exists: the optional val/ and test/ are skipped and validation_split (0.1) and
    test_split (0.1) of the 30 training images are held out."""
    root = make_image_folder(tmp_path / "images", counts=(("train", 10),))
    _, out = in_process("train.py", "-c", "configs/image_folder.json", "--dry-run",
                        *image_folder_args(root, tmp_path / "saved"))
    m = re.search(r"Data: (\d+) training, (\d+) validation samples", out)
    assert m, out
    assert int(m.group(2)) == round(30 * 0.1) == 3
    assert int(m.group(1)) == 30 - 3 - 3
    assert not (tmp_path / "saved").exists()
