"""Runs that race, branch, get copied, meet damaged or hostile files: nothing lost, nothing trusted."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import NAME, ROOT, THREADS_ENV, Run, assert_user_error, call_main, main_error, run_train, tree

FAST = ["trainer.tensorboard=false", "trainer.verbosity=1"]


def train_main(*argv):
    """train.py's main() in this process: the same code path, without a subprocess's start-up."""
    import train as train_script
    call_main(train_script.main, argv)


def evaluate_main(*argv):
    import test as test_script
    call_main(test_script.main, argv)


def user_error(script, argv, capsys, *fragments):
    """main() of train.py / test.py as the scripts run it: exit 2 and one 'error:' line with the fragments."""
    import test as test_script
    import train as train_script
    status, err = main_error({"train": train_script, "test": test_script}[script].main, argv, capsys)
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and all(f in err for f in fragments), err
    return err


def digest(folder):
    """{relative path: sha256} of every file under `folder`: compares a whole tree, contents included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def four_epochs(tmp_path_factory):
    """A finished 4-epoch run with a checkpoint after every epoch (read-only: tests copy it)."""
    save_dir = tmp_path_factory.mktemp("four") / "saved"
    train_main("-c", "config.json", "--run-id", "a", f"trainer.save_dir={save_dir}", "trainer.epochs=4",
               "trainer.save_period=1", *FAST)
    return Run(save_dir, "a")


def copy_of(run, save_dir):
    shutil.copytree(run.save_dir, save_dir)
    return Run(save_dir, run.run_id)


def start_training(*args, **popen):
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", "config.json", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(THREADS_ENV, PYTHONUNBUFFERED="1"), text=True, **popen)


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- data lost or corrupted by ordinary use -----------------------------------------------------

def test_a_second_process_cannot_train_into_a_run_in_use(tmp_path):
    save_dir = tmp_path / "saved"
    args = ["--auto-resume", "--run-id", "r", f"trainer.save_dir={save_dir}", "trainer.epochs=1000", *FAST]
    first = start_training(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = Run(save_dir, "r")
        wait_for(lambda: (run.model_dir / "checkpoint-epoch1.pth").exists())
        before = digest(run.log_dir)
        second = run_train("-c", "config.json", *args)
        assert_user_error(second, str(run.model_dir), "being trained by another process", f"pid {first.pid}")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    assert set(digest(run.log_dir)) == set(before)  # the second wrote no file of its own
    # the lock ends with its process: the run can now be resumed
    train_main("-c", "config.json", *args[:-3], "trainer.epochs=1", *FAST)


def test_resuming_one_checkpoint_twice_keeps_both_abandoned_futures(four_epochs, tmp_path):
    run = copy_of(four_epochs, tmp_path / "saved")
    original = {e: (run.model_dir / f"checkpoint-epoch{e}.pth").read_bytes() for e in (3, 4)}
    train_main("-r", run.model_dir / "checkpoint-epoch2.pth", "trainer.clip_grad_norm=0.01", *FAST)
    second = {e: (run.model_dir / f"checkpoint-epoch{e}.pth").read_bytes() for e in (3, 4)}
    train_main("-r", run.model_dir / "checkpoint-epoch2.pth", *FAST)
    folders = sorted((run.model_dir / "superseded").iterdir())
    assert len(folders) == 2
    kept = [{e: (f / f"checkpoint-epoch{e}.pth").read_bytes() for e in (3, 4)} for f in folders]
    assert original in kept and second in kept and original != second
    assert [int(r["epoch"]) for r in run.metrics()] == [1, 2, 3, 4]
    # taking an abandoned future up again continues it in the run, not inside superseded/
    train_main("-r", folders[0] / "checkpoint-epoch4.pth", "trainer.epochs=5", *FAST)
    assert (run.model_dir / "checkpoint-epoch5.pth").exists()
    assert sorted(p.name for p in folders[0].iterdir()) == ["checkpoint-epoch3.pth", "checkpoint-epoch4.pth"]
    assert len(list((run.model_dir / "superseded").iterdir())) == 3  # the run's other epoch 4 was set aside
    assert [int(r["epoch"]) for r in run.metrics()] == [1, 2, 3, 4, 5]


def test_resuming_a_copied_run_writes_into_the_copy_only(four_epochs, tmp_path):
    run = copy_of(four_epochs, tmp_path / "saved")
    copy_dir = run.model_dir.parent / "a_copy"
    shutil.copytree(run.model_dir, copy_dir)
    shutil.copytree(run.log_dir, run.log_dir.parent / "a_copy")
    before = digest(run.save_dir)
    train_main("-r", copy_dir / "checkpoint-epoch2.pth", "trainer.epochs=3", *FAST)
    changed = {k for k in set(before) | set(digest(run.save_dir)) if before.get(k) != digest(run.save_dir).get(k)}
    assert changed and all("/a_copy/" in k for k in changed), changed
    copied = Run(run.save_dir, "a_copy")
    assert [int(r["epoch"]) for r in copied.metrics()] == [1, 2, 3]
    assert copied.checkpoint("checkpoint-epoch3.pth")["run_id"] == "a_copy"


def test_a_checkpoint_outside_a_run_directory_resumes_beside_itself(four_epochs, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(four_epochs.model_dir / "checkpoint-epoch3.pth", loose)
    before = digest(four_epochs.save_dir)
    train_main("-r", loose / "checkpoint-epoch3.pth", *FAST)
    assert digest(four_epochs.save_dir) == before
    assert (loose / "checkpoint-epoch4.pth").exists() and (loose / "log" / "metrics.csv").exists()


def test_a_checkpoint_cannot_choose_where_a_resumed_run_writes(four_epochs, tmp_path, monkeypatch):
    run = copy_of(four_epochs, tmp_path / "saved")
    cwd = tmp_path / "a" / "b" / "c"  # resumed from here, "../../.." would be tmp_path
    cwd.mkdir(parents=True)
    (cwd / "data").symlink_to(ROOT / "data")
    for target in (str(tmp_path / "elsewhere"), "../../.."):
        checkpoint = run.checkpoint("checkpoint-epoch3.pth")
        checkpoint["config"]["trainer"]["save_dir"] = target
        torch.save(checkpoint, run.model_dir / "checkpoint-epoch3.pth")
        before = tree(tmp_path)
        monkeypatch.chdir(cwd)
        train_main("-r", run.model_dir / "checkpoint-epoch3.pth", *FAST)
        assert {p for p in tree(tmp_path) - before if not p.startswith("saved/")} == set()
        assert (run.model_dir / "checkpoint-epoch4.pth").exists()


def test_auto_resume_after_a_crash_in_the_first_epochs_logs_each_epoch_once(tmp_path):
    save_dir = tmp_path / "saved"
    args = ["--auto-resume", "--run-id", "c", f"trainer.save_dir={save_dir}", "trainer.save_last=false",
            "trainer.save_period=50", "trainer.verbosity=1"]
    proc = start_training(*args, "trainer.epochs=50", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = Run(save_dir, "c")
    wait_for(lambda: run.log_dir.joinpath("metrics.csv").exists() and len(run.metrics()) >= 2)
    proc.kill()  # before any checkpoint: the restart begins from scratch
    proc.wait()
    assert not list(run.model_dir.glob("checkpoint-*"))
    train_main("-c", "config.json", *args, "trainer.epochs=3")
    assert [int(r["epoch"]) for r in run.metrics()] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run.log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [40, 80, 120]


def test_a_restart_from_scratch_drops_earlier_events_whatever_their_file_names(tmp_path):
    """Event files sort by <time in seconds>.<host>.<pid>: an earlier attempt's file can sort after the
    restart's (same second, higher pid), where TensorBoard's purge_step would not reach it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    save_dir = tmp_path / "saved"
    run = Run(save_dir, "c")
    run.log_dir.mkdir(parents=True)
    with SummaryWriter(str(tmp_path / "old")) as writer:  # the crashed attempt's events, no checkpoint
        for step in (40, 80):
            writer.add_scalar("loss/train", 9.0, step)
    old = next((tmp_path / "old").glob("events.out.tfevents.*"))
    old.rename(run.log_dir / "events.out.tfevents.9999999999.host.99999.0")  # sorts after any new file
    train_main("-c", "config.json", "--auto-resume", "--run-id", "c", f"trainer.save_dir={save_dir}",
               "trainer.epochs=2", "trainer.verbosity=1")
    events = EventAccumulator(str(run.log_dir))
    events.Reload()
    assert [(e.step, e.value != 9.0) for e in events.Scalars("loss/train")] == [(40, True), (80, True)]


def test_a_crash_costs_at_most_one_epoch(tmp_path):
    """The rolling checkpoint: the newest epoch's is there even between save_period epochs."""
    save_dir = tmp_path / "saved"
    args = ["--auto-resume", "--run-id", "c", f"trainer.save_dir={save_dir}", "trainer.save_period=50", *FAST]
    proc = start_training(*args, "trainer.epochs=50", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = Run(save_dir, "c")
    wait_for(lambda: (run.model_dir / "checkpoint-epoch3.pth").exists())
    proc.kill()
    proc.wait()
    epochs = sorted(int(p.removeprefix("checkpoint-epoch").removesuffix(".pth")) for p in run.pth_files()
                    if p.startswith("checkpoint"))
    assert epochs[-1] >= 3 and len(epochs) <= 2  # one rolling checkpoint (two while the next replaces it)
    train_main("-c", "config.json", *args, f"trainer.epochs={epochs[-1] + 1}")
    newest = run.model_dir / f"checkpoint-epoch{epochs[-1]}.pth"
    assert f"(resumed from {newest})" in (run.log_dir / "info.log").read_text()
    left = {p for p in run.pth_files() if p.startswith("checkpoint")}
    assert f"checkpoint-epoch{epochs[-1] + 1}.pth" in left and f"checkpoint-epoch{epochs[-1]}.pth" not in left
    run.checkpoint("model_best.pth")  # a second name of an epoch's file: deleting the rolling one keeps it whole


@pytest.mark.parametrize("damage", ["nul_tail", "torn_row"])
def test_a_damaged_metrics_csv_does_not_block_a_resume(four_epochs, tmp_path, damage):
    run = copy_of(four_epochs, tmp_path / "saved")
    path = run.log_dir / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "nul_tail":  # what an unsynced file looks like after a power cut
        path.write_bytes("".join(lines[:4]).encode() + b"\0" * 300)
    else:
        path.write_text("".join(lines[:3]) + "3\n")  # epoch 3's row cut short
    (run.log_dir / ".metrics.csv.x1y2.tmp").write_text("epoch\n")
    train_main("-r", run.model_dir / "checkpoint-epoch3.pth", *FAST)
    rows = run.metrics()
    assert [int(r["epoch"]) for r in rows] == ([1, 2, 3, 4] if damage == "nul_tail" else [1, 2, 4])
    assert all(all(v != "" for v in r.values()) for r in rows)
    assert not list(run.log_dir.glob(".*.tmp"))


def test_repeated_sigterm_as_a_scheduler_sends_it_still_saves(tmp_path):
    save_dir = tmp_path / "saved"
    proc = start_training("--run-id", "p", f"trainer.save_dir={save_dir}", "trainer.epochs=100", "trainer.log_step=1",
                          "trainer.verbosity=2", "trainer.tensorboard=false", stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if "Train epoch 2 [3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out
    run = Run(save_dir, "p")
    marker = json.loads((run.model_dir / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and (run.model_dir / marker["checkpoint"]).exists()
    train_main("-r", marker["checkpoint"], "trainer.epochs=2", *FAST)
    assert not (run.model_dir / "preempted.json").exists()


# ---- files trusted that should not be ---------------------------------------------------------

def bomb(depth=9, width=9):
    """A value of width**depth leaves built from `depth` shared lists (what YAML aliases make)."""
    node = ["x"] * width
    for _ in range(depth):
        node = [node] * width
    return node


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\nname: *a9\n")
    started = time.monotonic()
    user_error("train", ["-c", tmp_path / "bomb.yaml"], capsys, "more than 100000 values")
    assert time.monotonic() - started < 30


def test_a_checkpoint_config_bomb_is_refused_quickly(four_epochs, tmp_path, capsys):
    run = copy_of(four_epochs, tmp_path / "saved")
    checkpoint = run.checkpoint("checkpoint-epoch2.pth")
    checkpoint["config"]["name"] = bomb()
    torch.save(checkpoint, run.model_dir / "checkpoint-epoch2.pth")
    started = time.monotonic()
    for script in ("train", "test"):
        user_error(script, ["-r", run.model_dir / "checkpoint-epoch2.pth"], capsys, "malformed checkpoint",
                   "at most 100000 values")
    assert time.monotonic() - started < 30


def test_a_huge_value_is_not_echoed_whole(tmp_path, capsys):
    for override in ("trainer.monitor=" + "x" * 1_000_000, "trainer.monitr=" + "x" * 1_000_000):
        line = user_error("train", ["-c", "config.json", f"trainer.save_dir={tmp_path}", override], capsys, "trainer.moni")
        assert len(line) < 1100


def malformed(checkpoint, kind):
    if kind == "int_run_id":
        checkpoint["run_id"] = 7
    elif kind == "path_run_id":
        checkpoint["run_id"] = "../elsewhere"
    elif kind == "bad_rng":
        checkpoint["rng"] = [{"python": 1, "numpy": 2, "torch": 3, "cuda": 4}]
    elif kind == "optimizer_groups":
        checkpoint["optimizer"]["param_groups"] = checkpoint["optimizer"]["param_groups"] * 2
    elif kind == "missing_trainer_key":
        del checkpoint["trainer"]["global_step"]
    elif kind == "list_config":
        checkpoint["config"] = [1, 2]
    elif kind == "string_epoch":
        checkpoint["epoch"] = "2"
    elif kind == "string_counter":
        checkpoint["trainer"]["epoch"] = "2"
    elif kind == "negative_epoch":
        checkpoint["epoch"] = checkpoint["trainer"]["epoch"] = -5
    elif kind == "huge_epoch":
        checkpoint["epoch"] = checkpoint["trainer"]["epoch"] = 10**12
    return checkpoint


@pytest.mark.parametrize("kind", ["int_run_id", "path_run_id", "bad_rng", "optimizer_groups", "missing_trainer_key",
                                  "list_config", "string_epoch", "string_counter", "negative_epoch", "huge_epoch"])
def test_a_malformed_checkpoint_is_one_line_and_changes_nothing(four_epochs, tmp_path, capsys, kind):
    run = copy_of(four_epochs, tmp_path / "saved")
    path = run.model_dir / "checkpoint-epoch2.pth"
    torch.save(malformed(run.checkpoint(path.name), kind), path)
    before = digest(run.save_dir)
    # test.py needs no optimizer or RNG state: a checkpoint whose optimizer or RNG state is unfit still evaluates
    for script in ("train", "test") if kind not in ("optimizer_groups", "bad_rng") else ("train",):
        user_error(script, ["-r", path], capsys, str(path))
    assert digest(run.save_dir) == before


def test_auto_resume_with_fewer_processes_falls_back_to_a_checkpoint_it_can_use(four_epochs, tmp_path):
    run = copy_of(four_epochs, tmp_path / "saved")
    mid = run.checkpoint("checkpoint-epoch4.pth")  # made into a mid-epoch checkpoint of 2 processes
    mid["epoch"], mid["trainer"]["epoch"], mid["trainer"]["batches_done"] = 5, 4, 10
    mid["rng"], mid["metrics"] = mid["rng"] * 2, [{}, {}]
    torch.save(mid, run.model_dir / "checkpoint-epoch5-step170.pth")
    train_main("-c", "config.json", "--auto-resume", "--run-id", "a", f"trainer.save_dir={run.save_dir}",
               "trainer.epochs=5", *FAST)
    assert f"(resumed from {run.model_dir / 'checkpoint-epoch4.pth'})" in (run.log_dir / "info.log").read_text()


# ---- silent wrong results ---------------------------------------------------------------------

@pytest.mark.parametrize("override", ["seed=2", "data_loader.validation_split=0.3", "data_loader.test_split=0.2"])
def test_test_py_refuses_overrides_that_move_training_samples_into_the_test_split(four_epochs, tmp_path, override,
                                                                                     capsys):
    run = copy_of(four_epochs, tmp_path / "saved")
    evaluate_main("-r", run.model_dir / "model_best.pth")
    before = (run.model_dir / "test_metrics.json").read_bytes()
    user_error("test", ["-r", run.model_dir / "model_best.pth", override], capsys, "the test split is not the data of")
    assert (run.model_dir / "test_metrics.json").read_bytes() == before


def test_test_metrics_record_the_overrides(four_epochs, tmp_path):
    run = copy_of(four_epochs, tmp_path / "saved")
    evaluate_main("-r", run.model_dir / "model_best.pth", "data_loader.batch_size=50")
    written = json.loads((run.model_dir / "test_metrics.json").read_text())
    assert written["overrides"] == ["data_loader.batch_size=50"]


# ---- input at fault: one line, exit 2, nothing written ----------------------------------------

def bad_input(tmp_path, case):
    """(extra arguments, fragment of the error) for one hostile input."""
    config = tmp_path / "c.json"
    if case == "non_utf8":
        config.write_bytes(b'{"name": "\xff\xfe"}')
        return ["-c", config], "not UTF-8"
    if case == "deep_json":
        config.write_text("[" * 100_000 + "]" * 100_000)
        return ["-c", config], "nested too deeply"
    if case == "deep_yaml":
        (tmp_path / "c.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000)
        return ["-c", tmp_path / "c.yaml"], "c.yaml"
    if case == "dev_zero":
        return ["-c", "/dev/zero"], "larger than"
    if case == "corrupt_digits":
        data = tmp_path / "data"
        data.mkdir()
        (data / "digits.csv.gz").write_bytes((ROOT / "data/digits.csv.gz").read_bytes()[:3000])
        return ["-c", "config.json", f"data_loader.dataset.args.root={data}"], "digits.csv.gz"
    fragment = {"seed_negative": ("seed=-1", "seed"), "seed_huge": (f"seed={2**32}", "seed"),
                "batch_huge": (f"data_loader.batch_size={10**20}", "data_loader.batch_size"),
                "nul_name": ("name=a\0b", "name"), "nul_save_dir": ("trainer.save_dir=a\0b", "trainer.save_dir"),
                "empty_save_dir": ("trainer.save_dir=", "trainer.save_dir")}
    if case in fragment:
        return ["-c", "config.json", fragment[case][0]], fragment[case][1]
    if case == "long_run_id":
        return ["-c", "config.json", "--run-id", "r" * 300], "--run-id"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["non_utf8", "deep_json", "deep_yaml", "dev_zero", "corrupt_digits", "seed_negative",
                                  "seed_huge", "batch_huge", "nul_name", "nul_save_dir", "empty_save_dir",
                                  "long_run_id"])
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, capsys):
    args, fragment = bad_input(tmp_path, case)
    save = [] if "save_dir" in case else [f"trainer.save_dir={tmp_path / 'saved'}"]
    if case == "nul_name" or case == "nul_save_dir":  # a NUL cannot pass through argv: use a config file
        key, value = args[2].split("=", 1)
        raw = json.loads((ROOT / "config.json").read_text())
        section, _, field = key.rpartition(".")
        (raw[section] if section else raw)[field] = value
        (tmp_path / "nul.json").write_text(json.dumps(raw))
        args = ["-c", tmp_path / "nul.json"]
    before = set(os.listdir(ROOT))
    user_error("train", [*args, *save], capsys, fragment)
    assert not (tmp_path / "saved").exists()
    assert set(os.listdir(ROOT)) == before  # e.g. no models/ and log/ in the repository


def test_a_log_path_that_is_a_file_leaves_no_run_behind(tmp_path, capsys):
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    (save_dir / "log").write_text("not a directory")
    args = ["-c", "config.json", "--run-id", "r", f"trainer.save_dir={save_dir}", "trainer.epochs=1", *FAST]
    user_error("train", args, capsys, "log")
    assert tree(save_dir) == {"log", "models", f"models/{NAME}"}
    (save_dir / "log").unlink()
    train_main(*args)  # the same --run-id is free


def test_disk_full_is_one_line_and_keeps_earlier_checkpoints(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = run_train("-c", "config.json", "--run-id", "f", f"trainer.save_dir={mount}", "trainer.epochs=20",
                           "trainer.verbosity=1")
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left" in lines[0], result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        run = Run(mount, "f")
        saved = [p for p in run.pth_files() if p.startswith("checkpoint")]
        assert saved
        for name in saved:
            run.checkpoint(name)  # loads: complete
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train_main("-c", "config.json", "--run-id", "m", f"trainer.save_dir={tmp_path}", "trainer.epochs=1",
                   "trainer.verbosity=1")
        run = Run(tmp_path, "m")
        evaluate_main("-r", run.model_dir / "model_best.pth")
    finally:
        os.umask(old)
    for path in [*run.model_dir.glob("*.pth"), run.model_dir / "config.json", run.log_dir / "metrics.csv",
                 run.model_dir / "test_metrics.json"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
