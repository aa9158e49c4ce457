"""The disk failing a run (full at the start, full after it, made read-only mid-run) and errors met while training:
one line, exit status 1 or 2, no traceback, and nothing left that blocks the run's id."""
import contextlib
import subprocess
import sys
import time

import pytest

from conftest import ROOT, THREADS_ENV, Run, assert_user_error, run_train, tree

FAST = ["trainer.verbosity=1"]


@contextlib.contextmanager
def mounted(*mount_args):
    """`mount *mount_args` for the duration (skips the test where mounting is not allowed: it needs root)."""
    if subprocess.run(["mount", *map(str, mount_args)], capture_output=True).returncode:
        pytest.skip("cannot mount here (needs root)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(mount_args[-1])], check=True)


def assert_one_error_line(result, status, *fragments):
    out = result.stdout + result.stderr
    assert result.returncode == status, out
    assert "Traceback" not in out and "Logging error" not in out, out
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    assert out.count("error: ") == 1, out  # not also on stdout (through the log)


def test_a_full_disk_at_the_start_leaves_nothing_that_blocks_the_run_id(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=6m", "tmpfs", disk):
        with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # until the disk is full
                f.write(b"x" * 4096)
        args = ["-c", "config.json", "--run-id", "f", f"trainer.save_dir={disk}", "trainer.epochs=1", *FAST]
        assert_user_error(run_train(*args), "No space left on device", "trainer.save_dir", str(disk))
        assert tree(disk) == {"filler", "models", "models/Digits_CNN", "log", "log/Digits_CNN"}
        (disk / "filler").unlink()
        result = run_train(*args)  # the same --run-id, once there is room
        assert result.returncode == 0, result.stderr
        assert Run(disk, "f").pth_files() == {"checkpoint-epoch1.pth", "model_best.pth"}


def test_a_disk_that_fills_after_the_start_is_one_line(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=8k", "tmpfs", disk):  # the config fits; info.log and TensorBoard's don't
        result = run_train("-c", "config.json", "--run-id", "f", f"trainer.save_dir={disk}", *FAST)
    assert_one_error_line(result, 1, "No space left on device", "the checkpoints saved before are intact")


def test_a_log_directory_made_read_only_mid_run_is_one_line(tmp_path):
    run = Run(tmp_path, "r")
    cmd = [sys.executable, "train.py", "-c", "config.json", "--run-id", "r", f"trainer.save_dir={tmp_path}",
           "trainer.epochs=200", *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=THREADS_ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run.log_dir / "metrics.csv").is_file():  # one epoch logged: TensorBoard's file is open
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        with mounted("--bind", run.log_dir, run.log_dir):
            subprocess.run(["mount", "-o", "remount,ro,bind", str(run.log_dir)], check=True)
            stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert_one_error_line(result, 1, "Read-only file system", str(run.log_dir))
    assert "b'" not in stderr  # the file's name as text, not as bytes
    assert run.pth_files()  # the checkpoints saved before


def test_a_training_error_is_printed_once_and_kept_in_info_log(tmp_path):
    result = run_train("-c", "config.json", "--run-id", "n", f"trainer.save_dir={tmp_path}", "optimizer.args.lr=1e30",
                       "trainer.tensorboard=false", *FAST)
    assert_one_error_line(result, 1, "non-finite training loss")
    assert "non-finite training loss" in (Run(tmp_path, "n").log_dir / "info.log").read_text()


def test_auto_resume_removes_a_save_cut_short_before_the_first_checkpoint(tmp_path):
    run = Run(tmp_path, "k")
    run.model_dir.mkdir(parents=True)
    stale = run.model_dir / ".checkpoint-epoch1.pth.0123456789abcdef.tmp"  # as a SIGKILL during the first save leaves
    stale.write_bytes(b"half a checkpoint")
    result = run_train("-c", "config.json", "--run-id", "k", "--auto-resume", f"trainer.save_dir={tmp_path}",
                       "trainer.epochs=1", "trainer.tensorboard=false", *FAST)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and run.pth_files() == {"checkpoint-epoch1.pth", "model_best.pth"}
