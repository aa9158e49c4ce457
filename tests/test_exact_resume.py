"""Exact resume: stopping and resuming (at an epoch boundary, mid-epoch, or on a signal) gives the
very run an uninterrupted one gives, bit for bit, on the CPU."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, THREADS_ENV, Run, assert_ok, assert_same_run, run_train

# config.json: 40 steps per epoch, dropout and shuffling on. A scheduler that changes the lr every
# epoch makes a scheduler state that was not restored visible in the weights.
COMMON = ["trainer.tensorboard=false", "trainer.verbosity=1", "lr_scheduler.args.step_size=1",
          "lr_scheduler.args.gamma=0.7"]
def copy_run(run: Run, save_dir) -> Run:
    shutil.copytree(run.save_dir, save_dir)
    return Run(save_dir, run.run_id)


@pytest.fixture(scope="module", params=[0, 2], ids=["workers0", "workers2"])
def straight(request, tmp_path_factory):
    """An uninterrupted 3-epoch run that also leaves mid-epoch checkpoints every 15 steps."""
    workers = request.param
    save_dir = tmp_path_factory.mktemp(f"straight{workers}") / "saved"
    args = ["-c", "config.json", "--run-id", "s", f"trainer.save_dir={save_dir}", "trainer.epochs=3",
            "trainer.save_period=1", "trainer.save_every_steps=15", f"data_loader.num_workers={workers}",
            *COMMON]
    assert_ok(run_train(*args))
    run = Run(save_dir, "s")
    run.args = args
    return run


def test_stop_after_k_epochs_then_resume_is_bitwise(straight, tmp_path):
    """A separate 1-epoch run, resumed with -r to 3 epochs, equals the 3-epoch run."""
    save_dir = tmp_path / "saved"
    args = [a.replace(str(straight.save_dir), str(save_dir)) for a in straight.args]
    assert_ok(run_train(*args, "trainer.epochs=1"))
    resumed = Run(save_dir, "s")
    assert_ok(run_train("-r", resumed.model_dir, "trainer.epochs=3"))
    assert_same_run(straight, resumed, "checkpoint-epoch3.pth")
    assert [int(r["epoch"]) for r in resumed.metrics()] == [1, 2, 3]


def test_resume_from_epoch_checkpoint_is_bitwise(straight, tmp_path):
    resumed = copy_run(straight, tmp_path / "saved")
    for later in ("checkpoint-epoch2.pth", "checkpoint-epoch3.pth"):
        (resumed.model_dir / later).unlink()
    assert_ok(run_train("-r", resumed.model_dir / "checkpoint-epoch1.pth"))
    assert_same_run(straight, resumed, "checkpoint-epoch3.pth")


@pytest.mark.parametrize("step", [45, 75])  # inside epoch 2 (steps 41..80)
def test_resume_mid_epoch_is_bitwise(straight, tmp_path, step):
    resumed = copy_run(straight, tmp_path / "saved")
    (resumed.model_dir / "checkpoint-epoch3.pth").unlink()
    middle = resumed.checkpoint(f"checkpoint-epoch2-step{step}.pth")
    assert middle["trainer"]["epoch"] == 1 and middle["trainer"]["batches_done"] == step - 40
    # the epoch's partial sums so far (one entry per process): loss and metrics, over step - 40 batches of 32
    (sums,) = middle["metrics"]
    assert set(sums) == {"loss", "accuracy", "top_k_acc"}
    assert all(s[1].item() == 32 * (step - 40) for s in sums.values())
    assert_ok(run_train("-r", resumed.model_dir / f"checkpoint-epoch2-step{step}.pth"))
    # the mid-epoch checkpoints written after the resume (partial metric sums included), and the end
    later = [f"checkpoint-epoch{(s - 1) // 40 + 1}-step{s}.pth" for s in range(step + 15, 120, 15)]
    assert later and all(name in resumed.pth_files() for name in later)  # rewritten: the old ones were set aside
    assert_same_run(straight, resumed, *later, "checkpoint-epoch3.pth")


def test_mid_epoch_resume_takes_the_next_batch_without_replay():
    """The loader starts at the next batch of the same order; nothing before it is produced."""
    from base import BaseDataLoader
    from data_loader.datasets import DigitsDataset

    loader = BaseDataLoader(DigitsDataset("data/"), 32, shuffle=True, seed=5)
    loader.set_epoch(3)
    full = [target for _, target in loader]
    loader.set_epoch(3, start_batch=7)
    rest = [target for _, target in loader]
    assert len(rest) == len(full) - 7
    assert all((a == b).all() for a, b in zip(rest, full[7:]))


def start_training(save_dir, *extra, new_session=False):
    """train.py in a subprocess with unbuffered output, logging every step (in a process group of
    its own with new_session)."""
    env = dict(THREADS_ENV, PYTHONUNBUFFERED="1")  # the thread count of every other run here: it sets the sums' order
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", "config.json", "--run-id", "s",
           f"trainer.save_dir={save_dir}", *COMMON, "trainer.log_step=1", "trainer.verbosity=2", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)


def wait_for_line(proc, text):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never appeared:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run."""
    save_dir = tmp_path_factory.mktemp("reference") / "saved"
    assert_ok(run_train("-c", "config.json", "--run-id", "s", f"trainer.save_dir={save_dir}", "trainer.epochs=3",
                        *COMMON))
    return Run(save_dir, "s")


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_exact_position_and_resumes_bitwise(tmp_path, reference, sig, status):
    save_dir = tmp_path / "saved"
    proc = start_training(save_dir, "trainer.epochs=3")
    wait_for_line(proc, "Train epoch 2 [5/40]")
    proc.send_signal(sig)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == status, out
    run = Run(save_dir, "s")
    saved = sorted(p for p in run.pth_files() if "-step" in p)
    assert len(saved) == 1, run.pth_files()
    assert f"Resume with: python train.py -r {run.model_dir / saved[0]}" in out
    assert run.checkpoint(saved[0])["trainer"]["epoch"] == 1  # stopped inside epoch 2
    assert "Traceback" not in out

    assert_ok(run_train("-r", run.model_dir / saved[0]))
    assert_same_run(reference, run, "checkpoint-epoch3.pth")


def test_second_sigint_exits_at_once():
    from utils.preemption import StopRequest

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN where the shell started pytest in the background
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first one only asks
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGINT)
        assert exc.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_auto_resume_starts_then_continues_the_newest_run(tmp_path):
    save_dir = tmp_path / "saved"
    runs = save_dir / "models" / "Digits_CNN"
    args = ["-c", "config.json", "--auto-resume", f"trainer.save_dir={save_dir}", *COMMON]
    assert_ok(run_train(*args, "trainer.epochs=1", "--run-id", "first"))  # nothing to resume: starts "first"
    assert_ok(run_train(*args, "trainer.epochs=1", "--run-id", "second"))  # no "second" yet: starts it
    assert sorted(p.name for p in runs.iterdir()) == ["first", "second"]
    assert_ok(run_train(*args, "trainer.epochs=2"))  # the newest run, "second", goes on
    assert [int(r["epoch"]) for r in Run(save_dir, "second").metrics()] == [1, 2]
    assert_ok(run_train(*args, "trainer.epochs=2", "--run-id", "first"))  # a named run goes on
    assert [int(r["epoch"]) for r in Run(save_dir, "first").metrics()] == [1, 2]
    assert_ok(run_train(*args, "trainer.epochs=2"))  # "first" was saved last and is complete: nothing to do
    assert sorted(p.name for p in runs.iterdir()) == ["first", "second"]
    assert [int(r["epoch"]) for r in Run(save_dir, "first").metrics()] == [1, 2]


def test_resume_refuses_to_override_what_the_checkpoint_fixes(digits_run):
    result = run_train("-r", digits_run.model_dir, "optimizer.args.lr=0.5")
    assert result.returncode == 2
    assert "a resumed run keeps its" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_to_the_process_group_with_workers_still_saves(tmp_path):
    """A scheduler (or Ctrl-C) signals every process of the job, DataLoader workers included."""
    save_dir = tmp_path / "saved"
    proc = start_training(save_dir, "trainer.epochs=3", "data_loader.num_workers=2", new_session=True)
    wait_for_line(proc, "Train epoch 1 [5/40]")
    os.killpg(proc.pid, signal.SIGTERM)  # the session leader's pid is the group's id
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 143, out
    assert "Traceback" not in out
    assert [p for p in Run(save_dir, "s").pth_files() if "-step" in p], out


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(straight, tmp_path):
    """Resuming from epoch 1 abandons epochs 2-3 of the old run: their checkpoints move to
    superseded/, so neither -r RUN_DIR nor keep_last acts on them."""
    run = copy_run(straight, tmp_path / "saved")
    assert_ok(run_train("-r", run.model_dir / "checkpoint-epoch1.pth", "trainer.epochs=2", "trainer.keep_last=1"))
    assert {p for p in run.pth_files() if p.startswith("checkpoint")} == {"checkpoint-epoch2.pth"}
    assert list(run.model_dir.glob("superseded/*/checkpoint-epoch3.pth"))
    assert run.checkpoint("checkpoint-epoch2.pth")["trainer"]["epoch"] == 2
    assert [int(r["epoch"]) for r in run.metrics()] == [1, 2]


def test_auto_resume_restarts_a_named_run_that_died_before_its_first_checkpoint(tmp_path):
    save_dir = tmp_path / "saved"
    (save_dir / "models" / "Digits_CNN" / "job7").mkdir(parents=True)  # created, then killed
    assert_ok(run_train("-c", "config.json", "--auto-resume", "--run-id", "job7", f"trainer.save_dir={save_dir}",
                        "trainer.epochs=1", *COMMON))
    assert "checkpoint-epoch1.pth" in Run(save_dir, "job7").pth_files()


def test_dry_run_of_a_checkpoint_saved_mid_epoch(straight, tmp_path):
    run = copy_run(straight, tmp_path / "saved")
    before = sorted(p.name for p in run.model_dir.iterdir())
    assert_ok(run_train("-r", run.model_dir / "checkpoint-epoch2-step45.pth", "--dry-run"))
    assert sorted(p.name for p in run.model_dir.iterdir()) == before
