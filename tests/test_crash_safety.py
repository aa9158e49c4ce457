"""Crash safety: atomic checkpoints under SIGKILL, retention, non-finite loss, bad checkpoint files."""
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import test as test_script
import train as train_script
from conftest import (ROOT, THREADS_ENV, Run, assert_user_error, call_main, main_error, run_script, run_train,
                      train)
from utils.checkpoint import CHECKPOINT_KEYS, list_checkpoints, load_checkpoint

FAST = ["trainer.tensorboard=false", "trainer.verbosity=0"]


def loadable_checkpoints(model_dir):
    """Every file under a checkpoint's name loads as a complete checkpoint."""
    names = [p for p in model_dir.glob("*.pth")]
    for path in names:
        checkpoint = load_checkpoint(path)
        assert CHECKPOINT_KEYS <= set(checkpoint)
    return names


def test_sigkill_during_saves_leaves_only_complete_checkpoints(tmp_path):
    """A save every step, killed with SIGKILL at several instants: every file with a checkpoint's
    name is complete, and the run resumes from its directory."""
    save_dir = tmp_path / "saved"
    run = Run(save_dir, "k")
    args = [sys.executable, str(ROOT / "train.py"), "-c", "config.json", "--run-id", "k",
            f"trainer.save_dir={save_dir}", "trainer.epochs=50", "trainer.save_every_steps=1", "trainer.keep_last=3",
            *FAST]
    for attempt, delay in enumerate([0.05, 0.13, 0.31, 0.5]):
        cmd = args if attempt == 0 else [sys.executable, str(ROOT / "train.py"), "-r", str(run.model_dir),
                                         "trainer.save_every_steps=1", "trainer.verbosity=0"]
        before = set(run.pth_files()) if run.model_dir.exists() else set()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=THREADS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until this process is saving
            if run.model_dir.exists() and set(run.pth_files()) - before:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert loadable_checkpoints(run.model_dir)
        assert len(list_checkpoints(run.model_dir)) <= 4  # keep_last=3, plus at most one not yet pruned
    # resuming cleans away temporary files a killed save left
    (run.model_dir / ".checkpoint-epoch9.pth.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves
    call_main(train_script.main, ["-r", run.model_dir, "trainer.epochs=1", "trainer.save_every_steps=0"])
    assert not list(run.model_dir.glob(".*.tmp"))


def test_keep_last_prunes_old_checkpoints_after_the_new_one(tmp_path):
    run = train(tmp_path / "saved", "trainer.epochs=2", "trainer.save_every_steps=10", "trainer.keep_last=2", *FAST,
                run_id="r")
    # 80 steps: mid-epoch saves at 10..70 (not at 40 and 80, the epoch ends), then epoch 2's checkpoint
    assert run.pth_files() == {"checkpoint-epoch2-step70.pth", "checkpoint-epoch2.pth", "model_best.pth"}
    # a mid-epoch checkpoint carries the epoch's partial metric sums (one entry per process)
    mid = run.checkpoint("checkpoint-epoch2-step70.pth")
    assert mid["epoch"] == 2 and mid["trainer"]["epoch"] == 1
    assert mid["trainer"]["global_step"] == 70 and mid["trainer"]["batches_done"] == 30
    assert isinstance(mid["metrics"], list) and len(mid["metrics"]) == 1
    sums = mid["metrics"][0]
    assert set(sums) == {"loss", "accuracy", "top_k_acc"}
    assert all(s[1].item() == 30 * 32 for s in sums.values())  # weights: the 960 samples of 30 batches
    assert 0 < sums["accuracy"][0].item() <= 960
    assert run.checkpoint("checkpoint-epoch2.pth")["metrics"] is None


def test_non_finite_loss_stops_without_saving_bad_weights(tmp_path):
    """lr 1e12: step 1 is finite (and saved), step 2's loss is not."""
    save_dir = tmp_path / "saved"
    result = run_train("-c", "config.json", "--run-id", "n", f"trainer.save_dir={save_dir}", "trainer.epochs=3",
                       "optimizer.args.lr=1e12", "trainer.save_every_steps=1", "trainer.log_step=1", *FAST)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines[-1] == ("error: non-finite training loss in epoch 1, at or before step 2 (checked every "
                         "trainer.log_step=1 steps); no checkpoint of these weights was written")
    assert "Traceback" not in result.stdout + result.stderr
    run = Run(save_dir, "n")
    assert run.pth_files() == {"checkpoint-epoch1-step1.pth"}
    kept = run.checkpoint("checkpoint-epoch1-step1.pth")
    assert all(torch.isfinite(t).all() for t in kept["model"].values())
    assert "non-finite training loss" in (run.log_dir / "info.log").read_text()


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    run = train(tmp_path_factory.mktemp("good") / "saved", "trainer.epochs=1", *FAST, run_id="g")
    return run.model_dir / "checkpoint-epoch1.pth"


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create a file
        return (open, (self.path, "w"))


def bad_files(tmp_path, good):
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(data[:1000] + bytes(200) + data[1200:])
    not_checkpoint = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(3)}, not_checkpoint)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    evil = tmp_path / "evil.pth"
    torch.save({"model": _CreatesFile(str(tmp_path / "PWNED"))}, evil)
    plain_pickle = tmp_path / "plain.pth"
    plain_pickle.write_bytes(pickle.dumps(_CreatesFile(str(tmp_path / "PWNED"))))
    return {"truncated": truncated, "corrupt": corrupt, "not_checkpoint": not_checkpoint, "text": text,
            "evil": evil, "plain_pickle": plain_pickle}


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "not_checkpoint", "text", "evil", "plain_pickle"])
@pytest.mark.parametrize("main", [train_script.main, test_script.main], ids=["train.py", "test.py"])
def test_bad_checkpoint_is_one_line_exit_2_and_runs_nothing(tmp_path, capsys, good_checkpoint, kind, main):
    path = bad_files(tmp_path, good_checkpoint)[kind]
    code, err = main_error(main, ["-r", path, "trainer.save_dir=" + str(tmp_path / "saved")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "saved").exists()
    if kind == "evil":  # a torch.save archive holding an object: refused before unpickling it
        assert "refused to load" in err
    if kind == "plain_pickle":  # not even a torch.save archive: never unpickled
        assert "not a checkpoint" in err


def test_code_in_a_checkpoint_is_refused_on_the_command_line(tmp_path, good_checkpoint):
    """The same as above through the real command line (test.py loads checkpoints the same way)."""
    path = bad_files(tmp_path, good_checkpoint)["evil"]
    result = run_script("train.py", "-r", path, "trainer.save_dir=" + str(tmp_path / "saved"))
    assert_user_error(result, str(path), "refused to load")
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "saved").exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path, capsys, good_checkpoint):
    other = tmp_path / "other.json"
    text = (ROOT / "config.json").read_text()
    assert '"DigitsModel", "args": {}' in text
    other.write_text(text.replace('"DigitsModel", "args": {}', '"LinearModel", "args": {}'))
    code, err = main_error(train_script.main, ["-c", other, "-r", good_checkpoint,
                                               f"trainer.save_dir={tmp_path / 'saved'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {good_checkpoint}: "), err
    for fragment in ("do not fit the model LinearModel", "missing keys: fc.bias, fc.weight", "unexpected keys: conv1.bias"):
        assert fragment in err
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("name", ["os.system", "eval", "__import__", "__class__", "_private", "exec", "BaseModel",
                                  "torch.load", "torch.nn._reduction", "torchvision.io.read_file"])
def test_config_types_reach_only_the_projects_names_and_the_allowlist(tmp_path, capsys, name):
    code, err = main_error(train_script.main, ["-c", "config.json", f"arch.type={name}",
                                               f"trainer.save_dir={tmp_path / 'saved'}"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: arch.type: unknown name '{name}'; "), err
    assert "available: DigitsDataset, DigitsModel" in err
    assert "a dotted name in torch.nn" in err
    assert not (tmp_path / "saved").exists()


def test_an_allowlisted_class_that_is_not_a_model_is_refused_before_anything_runs(tmp_path, capsys):
    """torch.optim.Adam is a reachable name, but not a model: the config is refused in one line."""
    code, err = main_error(train_script.main, ["-c", "config.json", "arch.type=torch.optim.Adam",
                                               f"trainer.save_dir={tmp_path / 'saved'}"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: arch.args: ") and "'params'" in err and "torch.optim.Adam(" in err
    assert not (tmp_path / "saved").exists()


FLAKY_MODEL = """

class FlakyModel(DigitsModel):
    \"\"\"A user's model with a bug that strikes at the 51st training batch.\"\"\"

    calls = 0

    def forward(self, x):
        if self.training:
            FlakyModel.calls += 1
            if FlakyModel.calls == 51:
                raise RuntimeError("boom in FlakyModel.forward")
        return super().forward(x)
"""


def test_a_run_that_crashes_midway_keeps_its_outputs_and_logs_the_traceback(tmp_path):
    project = tmp_path / "project"
    assert run_script("new_project.py", project).returncode == 0
    with open(project / "model" / "model.py", "a") as f:
        f.write(FLAKY_MODEL)
    save_dir = tmp_path / "saved"
    result = subprocess.run([sys.executable, "train.py", "-c", "config.json", "--run-id", "c", "arch.type=FlakyModel",
                             f"trainer.save_dir={save_dir}", "trainer.epochs=3", "trainer.save_period=1", *FAST],
                            cwd=project, env=THREADS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "boom in FlakyModel.forward" in result.stderr
    run = Run(save_dir, "c")
    assert run.pth_files() == {"checkpoint-epoch1.pth", "model_best.pth"}  # 40 steps per epoch: epoch 1 was saved
    assert load_checkpoint(run.model_dir / "checkpoint-epoch1.pth")["epoch"] == 1
    assert [row["epoch"] for row in run.metrics()] == ["1"]
    log = (run.log_dir / "info.log").read_text()
    assert "Training failed" in log and "Traceback" in log and "boom in FlakyModel.forward" in log
