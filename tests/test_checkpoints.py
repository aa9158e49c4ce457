"""Checkpoints: contents, safe loading, resume (same run, bitwise identical), fine-tuning, mismatches."""
import pytest
import torch

import test as test_script
import train as train_script
from conftest import (STEPS_PER_EPOCH, assert_ok, assert_same, assert_user_error, call_main, main_error,
                      read_json, run_train, train, tree, without_time)
from model.model import DigitsModel
from utils.checkpoint import find_checkpoint

FAST = "trainer.tensorboard=false"
STATE = ("model", "optimizer", "lr_scheduler", "scaler", "trainer", "metrics", "rng")  # everything a resume restores
KEYS = {"data", "arch", "run_id", "config", "epoch", "model",
         "optimizer", "lr_scheduler", "scaler", "trainer", "metrics", "rng",
         "callbacks"}


def dirs(path):
    return {p for p in tree(path) if (path / p).is_dir()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 epochs in one go, a checkpoint after each: the reference for the resume tests."""
    return train(tmp_path_factory.mktemp("straight") / "saved", "trainer.epochs=4", "trainer.save_period=1", FAST,
                 run_id="straight")


# ---- contents ---------------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["checkpoint-epoch3.pth", "model_best.pth"])
def test_checkpoint_is_plain_data_with_the_full_training_state(digits_run, file):
    checkpoint = torch.load(digits_run.model_dir / file, weights_only=True)  # no code can run from it
    assert set(checkpoint) == KEYS
    assert checkpoint["arch"] == "DigitsModel" and checkpoint["run_id"] == "r1"
    assert set(checkpoint["model"]) == set(DigitsModel().state_dict())  # no module. / _orig_mod. prefixes
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    DigitsModel().load_state_dict(checkpoint["model"])  # strict
    epoch = checkpoint["epoch"]
    if file == "checkpoint-epoch3.pth":
        assert epoch == 3
    trainer = checkpoint["trainer"]
    assert set(trainer) == {"epoch", "global_step", "batches_done", "monitor_best", "best_epoch", "not_improved_count"}
    assert trainer["epoch"] == epoch and trainer["batches_done"] == 0  # saved at an epoch's end
    assert trainer["global_step"] == STEPS_PER_EPOCH * epoch
    assert 0 < trainer["monitor_best"] <= 1 and trainer["not_improved_count"] >= 0  # max val_accuracy
    assert checkpoint["metrics"] is None  # no partial epoch to carry over
    assert checkpoint["scaler"] == {}  # no fp16: the disabled scaler's (empty) state
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.002
    assert all(s["step"] == STEPS_PER_EPOCH * epoch for s in checkpoint["optimizer"]["state"].values())
    assert checkpoint["lr_scheduler"]["last_epoch"] == epoch
    rng = checkpoint["rng"]
    assert isinstance(rng, list) and len(rng) == 1  # one per process
    assert {"python", "numpy", "torch"} <= set(rng[0])
    assert type(checkpoint["config"]) is dict
    assert checkpoint["config"] == read_json(digits_run.model_dir / "config.json")


def test_run_directory_resolves_to_its_newest_checkpoint(tmp_path):
    for name in ("checkpoint-epoch2.pth", "checkpoint-epoch10.pth", "checkpoint-epoch9.pth", "model_best.pth"):
        (tmp_path / name).write_bytes(b"")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint-epoch10.pth"  # by number, not by name


# ---- resume -----------------------------------------------------------------------------------

def test_resume_from_run_directory_continues_the_same_run_bitwise(tmp_path, straight):
    part = train(tmp_path / "saved", "trainer.epochs=2", FAST, run_id="part")
    dirs_before = dirs(tmp_path / "saved")
    call_main(train_script.main, ["-r", part.model_dir, "trainer.epochs=4"])

    assert dirs(tmp_path / "saved") == dirs_before  # same run directories, no new ones
    assert [int(r["epoch"]) for r in part.metrics()] == [1, 2, 3, 4]  # appended, no duplicates
    assert without_time(part.metrics()) == without_time(straight.metrics())
    resumed, reference = part.checkpoint("checkpoint-epoch4.pth"), straight.checkpoint("checkpoint-epoch4.pth")
    for key in STATE:
        assert_same(resumed[key], reference[key], key)
    assert resumed["run_id"] == "part"
    assert read_json(part.model_dir / "config.json")["trainer"]["epochs"] == 4


def test_resume_from_checkpoint_file_on_the_command_line(tmp_path, straight):
    """`train.py -r checkpoint-epoch1.pth` rewinds the run to epoch 1 and goes on from there:
    metrics.csv and TensorBoard keep one entry per epoch; the abandoned epoch-2 checkpoint is set
    aside in superseded/, the only new directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = train(tmp_path / "saved", "trainer.epochs=2", "trainer.save_period=1", run_id="a")
    dirs_before = dirs(tmp_path / "saved")
    assert_ok(run_train("-r", run.model_dir / "checkpoint-epoch1.pth", "trainer.epochs=4"))

    (moved_to,) = (run.model_dir / "superseded").iterdir()  # one folder per resume that set files aside
    assert dirs(tmp_path / "saved") == dirs_before | {"models/Digits_CNN/a/superseded",
                                                      f"models/Digits_CNN/a/superseded/{moved_to.name}"}
    assert [p.name for p in moved_to.iterdir()] == ["checkpoint-epoch2.pth"]
    assert [int(r["epoch"]) for r in run.metrics()] == [1, 2, 3, 4]
    assert without_time(run.metrics()) == without_time(straight.metrics())
    assert run.pth_files() - {"model_best.pth"} == {f"checkpoint-epoch{e}.pth" for e in (1, 2, 3, 4)}
    resumed, reference = run.checkpoint("checkpoint-epoch4.pth"), straight.checkpoint("checkpoint-epoch4.pth")
    for key in STATE:
        assert_same(resumed[key], reference[key], key)

    acc = EventAccumulator(str(run.log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == [STEPS_PER_EPOCH * e for e in (1, 2, 3, 4)]


def test_resume_keeps_the_run_id(tmp_path, capsys, straight):
    code, err = main_error(train_script.main, ["-r", straight.model_dir, "--run-id", "other"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --run-id")


# ---- fine-tuning ------------------------------------------------------------------------------

def test_fine_tune_starts_a_new_run_from_the_checkpoint_weights(tmp_path):
    save_dir = tmp_path / "saved"
    source = train(save_dir, "trainer.epochs=1", FAST, run_id="source")
    source_files = {p: (source.model_dir / p).read_bytes() for p in tree(source.model_dir)}
    weights = source.checkpoint("checkpoint-epoch1.pth")["model"]

    # lr 0: the new run's weights stay exactly what it started from
    train(save_dir, "trainer.epochs=1", "optimizer.args.lr=0.0", FAST, run_id="ft",
          extra=["-r", source.model_dir / "checkpoint-epoch1.pth"])
    assert dirs(save_dir) >= {"models/Digits_CNN/source", "models/Digits_CNN/ft", "log/Digits_CNN/ft"}
    tuned = torch.load(save_dir / "models/Digits_CNN/ft/checkpoint-epoch1.pth", weights_only=True)
    assert_same(tuned["model"], weights, "model")
    assert tuned["run_id"] == "ft" and tuned["epoch"] == 1
    assert tuned["trainer"]["global_step"] == STEPS_PER_EPOCH  # a fresh count and a fresh optimizer
    assert all(s["step"] == STEPS_PER_EPOCH for s in tuned["optimizer"]["state"].values())
    assert {p: (source.model_dir / p).read_bytes() for p in tree(source.model_dir)} == source_files


# ---- checkpoints that do not fit --------------------------------------------------------------

def test_checkpoint_of_another_architecture_is_one_line(tmp_path, straight):
    result = run_train("-c", "config.json", "-r", straight.model_dir / "checkpoint-epoch1.pth",
                       f"trainer.save_dir={tmp_path / 'saved'}", "arch.type=LinearModel")
    assert_user_error(result, "DigitsModel", "LinearModel", "missing keys: fc.bias, fc.weight",
                      "unexpected keys: conv1.bias, conv1.weight")
    assert not (tmp_path / "saved").exists()


def test_dry_run_resume_and_refused_resume_change_nothing(tmp_path, capsys):
    run = train(tmp_path / "saved", "trainer.epochs=1", FAST)
    save_dir = tmp_path / "saved"

    def files():
        return {p: (save_dir / p).read_bytes() for p in tree(save_dir) if (save_dir / p).is_file()}

    before = files()
    call_main(train_script.main, ["-r", run.model_dir, "--dry-run", "trainer.epochs=3"])
    assert files() == before
    code, err = main_error(train_script.main, ["-r", run.model_dir, "arch.type=LinearModel"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "arch" in err, err
    assert files() == before


def test_unloadable_checkpoints_are_one_line_errors(tmp_path, capsys, straight):
    good = (straight.model_dir / "checkpoint-epoch1.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[:len(good) // 2])
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    unsafe = tmp_path / "unsafe.pth"
    checkpoint = torch.load(straight.model_dir / "checkpoint-epoch1.pth", weights_only=True)
    torch.save({**checkpoint, "config": torch.nn.Identity()}, unsafe)  # a pickled object: code on load
    for path, fragment in ((truncated, "truncated or corrupt"), (text, "not a checkpoint"),
                           (unsafe, "refused to load"), (tmp_path / "missing.pth", "no such checkpoint")):
        for main in (train_script.main, test_script.main):
            code, err = main_error(main, ["-r", path], capsys)
            assert code == 2, (path, err)
            assert err.count("\n") == 1 and err.startswith(f"error: {path}") and fragment in err, err
