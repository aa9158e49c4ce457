"""sweep.py: real trials (train.py subprocesses), real signals, real SQLite, PostgreSQL and torchrun."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

import sweep as sweep_script
from conftest import ROOT, THREADS_ENV, Run, assert_ok, assert_same_run, main_error, read_csv, run_script, run_train

FAST = {"epochs": 2, "len_epoch": 8, "tensorboard": False, "verbosity": 1, "save_period": 1}


def make_config(tmp_path, file="config.json", **trainer):
    """config.json with its runs under tmp_path/saved, short epochs and no input images."""
    config = json.loads((ROOT / "config.json").read_text())
    config["trainer"].update(FAST, save_dir=str(tmp_path / "saved"), **trainer)
    config["callbacks"] = []
    (tmp_path / file).write_text(json.dumps(config))
    return tmp_path / file


def sweep_popen(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *map(str, args)], cwd=ROOT, env=THREADS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def table(sweep_dir):
    return read_csv(Path(sweep_dir) / "trials.csv")


def wait_for(condition, proc=None, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, proc.stdout.read() if proc else ""
        time.sleep(0.02)


def epochs_logged(sweep_dir, run):
    path = Path(sweep_dir) / "log" / "Digits_CNN" / run / "metrics.csv"
    return [row["epoch"] for row in read_csv(path)] if path.exists() else []


@pytest.mark.parametrize("args,space,fragment", [
    (["optimizer.args.lrr=0.1,0.2"], None, "no key 'optimizer.args.lrr'"),
    (["trainer.epochs=2,0"], None, "trainer.epochs: must be in [1, "),
    (["trainer.epoch=2,3"], None, "trainer.epoch"),
    ([], {"parameters": {"optimizer.args.lr": {"low": 0.1, "high": 0.01}}}, "optimizer.args.lr: `low <= high` must hold, but got (low=0.1, high=0.01)"),
    ([], {"parameters": {"optimizer.args.lr": []}}, "optimizer.args.lr: The `choices` must contain one or more elements"),
    ([], {"parameters": {"data_loader.batch_size": {"low": 0, "high": 64}}}, "data_loader.batch_size: must be in"),
    ([], {"parameters": {"seed": [1, 2]}, "sampler": "annealing"}, "sampler: must be one of grid, random, tpe"),
    ([], {"parameters": {"seed": [1, 2]}, "colour": 1}, "colour: a SPACE has parameters"),
    ([], {"parameters": {"seed": [1, 2]}, "objective": "max val_acc"}, "objective: 'max val_acc' is not"),
    ([], "{not json", "space.json:1:2: invalid JSON"),
])
def test_bad_input_is_one_line_naming_the_key_exit_2_and_creates_nothing(tmp_path, capsys, args, space, fragment):
    config = make_config(tmp_path)
    if space is not None:
        (tmp_path / "space.json").write_text(space if isinstance(space, str) else json.dumps(space))
        args = ["-s", tmp_path / "space.json", "--trials", "2"]
    code, err = main_error(sweep_script.main, ["-c", config, *args], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "saved").exists()


def test_a_grid_sweep_records_every_trial_and_failures_do_not_end_it(tmp_path):
    """A good value, a NaN loss, a value Adam refuses and an exception in user code (top-k with k > classes)."""
    config = make_config(tmp_path, tensorboard=True)
    config_json = json.loads(config.read_text())
    config_json["metrics"] = ["accuracy", {"type": "top_k_acc", "args": {"k": 3}}]
    config.write_text(json.dumps(config_json))
    (tmp_path / "space.yaml").write_text("sampler: grid\nparameters:\n  optimizer.args.lr: [0.005, 1.0e+12, -1]\n"
                                         "  metrics.1.args.k: [3, 100]\n")
    result = run_script("sweep.py", "-c", config, "-s", tmp_path / "space.yaml", "--workers", "2", timeout=600)
    assert_ok(result)
    sweep_dir = tmp_path / "saved" / "sweeps" / "space"
    rows = table(sweep_dir)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3", "4", "5"]  # the whole grid
    by_params = {(r["optimizer.args.lr"], r["metrics.1.args.k"]): r for r in rows}
    assert set(by_params) == {(lr, k) for lr in ("-1", "0.005", "1000000000000.0") for k in ("3", "100")}
    good, user_bug = by_params[("0.005", "3")], by_params[("0.005", "100")]
    assert good["state"] == "COMPLETE" and good["error"] == ""
    assert float(good["objective"]) == max(float(r["val_accuracy"]) for r in read_csv(
        sweep_dir / "log" / "Digits_CNN" / f"trial-{good['number']}" / "metrics.csv"))
    assert user_bug["state"] == "FAIL" and "RuntimeError" in user_bug["error"] and "(exit status 1)" in user_bug["error"]
    for k in ("3", "100"):
        refused = by_params[("-1", k)]
        assert refused["state"] == "FAIL" and "Invalid learning rate: -1 (exit status 2)" in refused["error"]
    # the best trial's run is an ordinary run: config, checkpoints, metrics.csv, TensorBoard; test.py takes it
    run = Path(good["runs"])
    assert run == sweep_dir / "models" / "Digits_CNN" / f"trial-{good['number']}"
    assert {"config.json", "checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "model_best.pth"} <= \
        {p.name for p in run.iterdir()}
    assert glob.glob(str(sweep_dir / "log" / "Digits_CNN" / run.name / "events.out.tfevents.*"))
    lines = result.stdout.splitlines()
    assert lines[-2].startswith(f"Best trial {good['number']}: val_accuracy {float(good['objective']):.6g}; {run}")
    assert lines[-1] == f"Reproduce it: python train.py -c {config} optimizer.args.lr=0.005 metrics.1.args.k=3"
    assert_ok(run_script("test.py", "-r", run / "model_best.pth"))
    nan = by_params[("1000000000000.0", "3")]
    assert nan["state"] == "FAIL" and "non-finite training loss" in nan["error"]


def test_sigkill_during_a_trial_then_the_same_command_resumes_it_exactly(tmp_path):
    config = make_config(tmp_path, epochs=3, len_epoch=None)
    args = ["-c", config, "optimizer.args.lr=0.01,0.005"]
    sweep_dir = tmp_path / "saved" / "sweeps" / "grid"
    proc = sweep_popen(*args)
    wait_for(lambda: epochs_logged(sweep_dir, "trial-0") == ["1"], proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the trial was told to stop (SIGTERM on the sweep's death), saved its place and left preempted.json
    wait_for(lambda: (sweep_dir / "models" / "Digits_CNN" / "trial-0" / "preempted.json").exists(), timeout=60)
    assert epochs_logged(sweep_dir, "trial-0") in (["1"], ["1", "2"])
    result = run_script("sweep.py", *args)
    assert_ok(result)
    rows = table(sweep_dir)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE")]
    assert "Resumed from" in (sweep_dir / "output" / "trial-0.log").read_text()
    # exactly the run an uninterrupted train.py makes with the trial's values
    reference = tmp_path / "reference"
    assert_ok(run_train("-c", config, "--run-id", "trial-0", f"trainer.save_dir={reference}",
                        f"optimizer.args.lr={rows[0]['optimizer.args.lr']}"))
    assert_same_run(Run(sweep_dir, "trial-0"), Run(reference, "trial-0"), "checkpoint-epoch3.pth", "model_best.pth")


def test_sigterm_and_sigkill_between_trials_reach_the_number_asked_and_no_more(tmp_path):
    config = make_config(tmp_path, epochs=1)
    args = ["-c", config, "optimizer.args.lr=0.01,0.005,0.002", "--workers", "1"]
    sweep_dir = tmp_path / "saved" / "sweeps" / "grid"
    proc = sweep_popen(*args)
    wait_for(lambda: (sweep_dir / "models" / "Digits_CNN" / "trial-0").exists(), proc)
    proc.send_signal(signal.SIGTERM)  # as a scheduler does: the trial stops and saves, the sweep exits 143
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "the same command continues" in out
    assert [r["state"] for r in table(sweep_dir)] == ["RUNNING"]
    proc = sweep_popen(*args)  # killed the moment trial 1 has written its last checkpoint: the sweep's bookkeeping
    wait_for(lambda: (sweep_dir / "models" / "Digits_CNN" / "trial-1" / "checkpoint-epoch1.pth").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_script("sweep.py", *args)
    assert_ok(result)
    rows = table(sweep_dir)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE"), ("2", "COMPLETE")]
    assert sorted(r["optimizer.args.lr"] for r in rows) == ["0.002", "0.005", "0.01"]
    for n in range(3):
        assert epochs_logged(sweep_dir, f"trial-{n}") == ["1"]  # each epoch trained and logged once
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert len(study.trials) == 3


def test_workers_run_trials_at_once_and_repeat_reports_mean_and_spread(tmp_path):
    config = make_config(tmp_path, epochs=1)
    result = run_script("sweep.py", "-c", config, "optimizer.args.lr=0.01,0.002", "--workers", "2", "--repeat", "2",
                        timeout=600)
    assert_ok(result)
    sweep_dir = tmp_path / "saved" / "sweeps" / "grid"
    rows = table(sweep_dir)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for row in rows:
        runs = row["runs"].split()
        assert [Path(r).name for r in runs] == [f"trial-{row['number']}-seed1", f"trial-{row['number']}-seed2"]
        values = [max(float(x["val_accuracy"]) for x in read_csv(sweep_dir / "log" / "Digits_CNN" / Path(r).name /
                                                                  "metrics.csv")) for r in runs]
        assert float(row["objective"]) == pytest.approx(sum(values) / 2)
        assert float(row["spread"]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert [Run(sweep_dir, Path(r).name).checkpoint("checkpoint-epoch1.pth")["config"]["seed"] for r in runs] \
            == [1, 2]
    trials = optuna.load_study(study_name="grid", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials
    assert trials[0].datetime_start < trials[1].datetime_complete and \
        trials[1].datetime_start < trials[0].datetime_complete  # the two ran at the same time
    assert "(mean of 2 seeds, spread " in result.stdout


def test_trials_under_torchrun_and_the_median_pruner(tmp_path):
    """--nproc 2: every trial is a 2-process gloo run of the trial's values; weight decay 10 is hopeless next to 0
    after one epoch, and the median pruner stops it."""
    config = make_config(tmp_path, epochs=2)
    (tmp_path / "space.json").write_text(json.dumps({
        "parameters": {"optimizer.args.weight_decay": [10, 0]}, "sampler": "grid",  # run as 0, 10 (Optuna's order)
        "pruner": {"type": "median", "args": {"n_startup_trials": 1}}}))
    result = run_script("sweep.py", "-c", config, "-s", tmp_path / "space.json", "--nproc", "2", timeout=600)
    assert_ok(result)
    sweep_dir = tmp_path / "saved" / "sweeps" / "space"
    rows = table(sweep_dir)
    assert [(r["optimizer.args.weight_decay"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("10", "PRUNED")]
    assert rows[1]["error"].startswith("pruned by the sweep at epoch 1 (val_accuracy ")
    kept = Run(sweep_dir, "trial-0").checkpoint("checkpoint-epoch2.pth")
    assert len(kept["rng"]) == 2 and kept["config"]["optimizer"]["args"]["weight_decay"] == 0
    pruned_log = (sweep_dir / "output" / "trial-1.log").read_text()
    assert pruned_log.count("error: pruned by the sweep at epoch 1") == 2  # each rank's one line on stderr
    # no traceback of train.py's; torchrun reports a failed rank with one of its own, as for any failed run
    assert pruned_log.count("Traceback") == pruned_log.count("errors.ChildFailedError: ") == 1
    assert (sweep_dir / "models" / "Digits_CNN" / "trial-1" / "config.json").exists()
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert study.trials[1].intermediate_values.keys() == {1} and study.trials[0].intermediate_values.keys() == {1, 2}


# ---- PostgreSQL: a real server, started by the test ----------------------------------------------------------

def postgres_bin():
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).parent if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 and a free port, in a temporary directory, run as a non-root user."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL is not installed (.ci/run installs it: apt-get install -y postgresql)"
        if os.environ.get("SWEEP_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run([*as_user, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_commands_share_one_study_on_postgresql(tmp_path, postgres):
    """Two sweep processes (as on two machines: each its own save_dir) on one study reach 4 trials in all."""
    (tmp_path / "space.json").write_text(json.dumps({
        "parameters": {"optimizer.args.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "sampler": "random",
        "trials": 4}))
    machines = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for machine in machines:
        machine.mkdir()
        procs.append(sweep_popen("-c", make_config(machine, epochs=1), "-s", tmp_path / "space.json", "--storage",
                                 postgres, "--name", "shared"))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    study = optuna.load_study(study_name="shared", storage=postgres)
    counted = [t for t in study.trials if not t.user_attrs.get("void")]
    assert [t.state for t in counted] == [optuna.trial.TrialState.COMPLETE] * 4
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials if t.user_attrs.get("void"))
    ran = {m: sorted(p.name for p in (m / "saved" / "sweeps" / "shared" / "models" / "Digits_CNN").iterdir())
           for m in machines}
    assert sorted(sum(ran.values(), [])) == sorted(f"trial-{t.number}" for t in counted)
    assert all(ran.values()), ran  # both did some of the work
    for machine in machines:  # each keeps a table of the whole study (as it stood when it ended)
        assert set(ran[machine]) <= {f"trial-{r['number']}" for r in table(machine / "saved" / "sweeps" / "shared")}
