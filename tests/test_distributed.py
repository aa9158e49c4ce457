"""torch.distributed on the CPU: real torchrun, 2 processes, gloo."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conftest import (ROOT, THREADS_ENV, Run, assert_ok, assert_same, assert_user_error, parse_config, run_script,
                      run_train, without_time)

FAST = ["trainer.tensorboard=false", "trainer.verbosity=1"]
LINEAR = ["arch.type=LinearModel", "lr_scheduler=null", "trainer.monitor=off", "optimizer.type=SGD",
          'optimizer.args={"lr": 0.5}']


def torchrun(*args, nproc=2, timeout=300, cwd=ROOT, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *map(str, args)]
    env = dict(THREADS_ENV, PYTHONUNBUFFERED="1")
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """2 processes, 2 epochs, a checkpoint after each."""
    save_dir = tmp_path_factory.mktemp("ddp") / "saved"
    result = torchrun("-c", "config.json", "--run-id", "d", f"trainer.save_dir={save_dir}", "trainer.epochs=2",
                      "trainer.save_period=1", *FAST)
    assert_ok(result)
    run = Run(save_dir, "d")
    run.result = result
    return run


def test_torchrun_run_has_one_run_directory_written_by_rank_0(ddp_run):
    assert [p.name for p in (ddp_run.save_dir / "models" / "Digits_CNN").iterdir()] == ["d"]
    assert [p.name for p in (ddp_run.save_dir / "log" / "Digits_CNN").iterdir()] == ["d"]
    assert ddp_run.pth_files() == {"checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "model_best.pth"}
    assert [r["epoch"] for r in ddp_run.metrics()] == ["1", "2"]
    assert float(ddp_run.metrics()[-1]["val_accuracy"]) > 0.8
    checkpoint = ddp_run.checkpoint("checkpoint-epoch2.pth")
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # the bare module
    assert len(checkpoint["rng"]) == 2  # each process's RNG state
    # only rank 0 prints the per-epoch lines
    assert ddp_run.result.stdout.count("    val_accuracy ") == 2


def test_ddp_resume_is_bitwise(ddp_run, tmp_path):
    import shutil

    resumed = Run(tmp_path / "saved", "d")
    shutil.copytree(ddp_run.save_dir, resumed.save_dir)
    (resumed.model_dir / "checkpoint-epoch2.pth").unlink()
    assert_ok(torchrun("-r", resumed.model_dir / "checkpoint-epoch1.pth"))
    a, b = ddp_run.checkpoint("checkpoint-epoch2.pth"), resumed.checkpoint("checkpoint-epoch2.pth")
    for key in ("model", "optimizer", "lr_scheduler", "scaler", "trainer", "metrics", "rng"):
        assert_same(a[key], b[key], key)
    assert without_time(ddp_run.metrics()) == without_time(resumed.metrics())


def test_ddp_checkpoint_resumes_in_one_process_and_the_reverse(ddp_run, tmp_path):
    import shutil

    single = Run(tmp_path / "single", "d")
    shutil.copytree(ddp_run.save_dir, single.save_dir)
    result = run_train("-r", single.model_dir / "checkpoint-epoch2.pth", "trainer.epochs=3")
    assert_ok(result)
    assert "RNG states are not restored" in result.stdout
    assert [r["epoch"] for r in single.metrics()] == ["1", "2", "3"]
    # ... and that single-process checkpoint resumes under torchrun
    assert_ok(torchrun("-r", single.model_dir / "checkpoint-epoch3.pth", "trainer.epochs=4"))
    assert [r["epoch"] for r in single.metrics()] == ["1", "2", "3", "4"]


def test_two_processes_with_half_batches_equal_one_with_full_batches(tmp_path):
    """The sampler splits each shuffled order between the ranks, and DDP averages their gradients, so
    per-rank batch 16 on 2 processes is batch 32 on one (39 full batches: 1257 samples)."""
    args = ["-c", "config.json", "--run-id", "e", *LINEAR, *FAST, "trainer.epochs=1", "trainer.len_epoch=39"]
    assert_ok(run_train(*args, f"trainer.save_dir={tmp_path / 'one'}", "data_loader.batch_size=32"))
    assert_ok(torchrun(*args, f"trainer.save_dir={tmp_path / 'two'}", "data_loader.batch_size=16"))
    one = Run(tmp_path / "one", "e").checkpoint("checkpoint-epoch1.pth")["model"]
    two = Run(tmp_path / "two", "e").checkpoint("checkpoint-epoch1.pth")["model"]
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-5)


def _validation(batch_size=25):
    """A Trainer with LinearModel (seeded weights) and config.json's validation split, batched for
    evaluation; under torch.distributed the loader holds this process's shard."""
    from base import BaseDataLoader
    from base.base_data_loader import make_datasets
    from base.base_metric import metric_object
    from model.loss import nll_loss
    from model.metric import MacroF1, accuracy
    from model.model import LinearModel
    from trainer import Trainer

    config = parse_config(f"data_loader.dataset.args.root={ROOT / 'data'}")
    loader = BaseDataLoader(make_datasets(config)["valid"], batch_size, even_shards=False, seed=config["seed"])
    torch.manual_seed(0)
    metrics = {"accuracy": metric_object(accuracy), "macro_f1": metric_object(MacroF1())}
    return Trainer(LinearModel(), nll_loss, metrics, None, config, torch.device("cpu")), loader


def _evaluate_on_rank(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer, valid = _validation()
        shard = valid.sampler.indices().tolist()
        queue.put((rank, shard, trainer.evaluate(valid)))
    finally:
        tdist.destroy_process_group()


def test_validation_metrics_are_reduced_to_the_single_process_numbers():
    """Each of 2 processes sees half the 270 validation samples (uneven batches of 25); both report
    the numbers one process reports on all of them: the batch means (loss, accuracy) and a Metric
    computed from the summed confusion matrix (MacroF1)."""
    trainer, valid = _validation()
    single = trainer.evaluate(valid)
    assert set(single) == {"loss", "accuracy", "macro_f1"}

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_evaluate_on_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: (shard, res) for rank, shard, res in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    shards = [set(results[rank][0]) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 135 and shards[0] | shards[1] == set(range(270))
    for rank in (0, 1):
        for key in single:
            assert results[rank][1][key] == pytest.approx(single[key], rel=1e-6), key
    assert results[0][1] == results[1][1]


def training_into_epoch_2(save_dir, run_id, *overrides):
    """A long torchrun training, read until its third step of epoch 2: (process, output lines so far)."""
    proc = torchrun("-c", "config.json", "--run-id", run_id, f"trainer.save_dir={save_dir}", "trainer.epochs=100",
                    "trainer.log_step=1", "trainer.verbosity=2", "trainer.tensorboard=false", *overrides,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Train epoch 2 [3/" in line:
            break
    return proc, lines


def preempt_as_a_scheduler(proc, lines):
    """SIGTERM to every worker of torchrun `proc`, then to torchrun itself a moment later; its whole output."""
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "train.py"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) != 0
    return out


def test_sigterm_to_torchrun_stops_all_ranks_and_rank_0_saves(tmp_path):
    save_dir = tmp_path / "saved"
    proc, lines = training_into_epoch_2(save_dir, "t")
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) != 0
    run = Run(save_dir, "t")
    saved = [p for p in run.pth_files() if "-step" in p]
    assert len(saved) == 1, out
    assert "Resume with: python train.py -r" in out
    middle = run.checkpoint(saved[0])
    assert middle["trainer"]["epoch"] == 1  # stopped inside epoch 2, same step on both ranks
    assert len(middle["metrics"]) == 2  # each process's partial sums of the epoch so far
    # those sums belong to 2 processes: a mid-epoch checkpoint resumes only with as many
    assert_user_error(run_train("-r", run.model_dir / saved[0]), "saved by 2 process(es)")
    assert_ok(torchrun("-r", run.model_dir / saved[0], "trainer.epochs=2"))
    assert [r["epoch"] for r in run.metrics()] == ["1", "2"]


def test_a_crashed_rank_ends_the_whole_job(tmp_path):
    save_dir = tmp_path / "saved"
    proc = torchrun("-c", "config.json", "--run-id", "x", f"trainer.save_dir={save_dir}", "trainer.epochs=1000",
                    *FAST, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch               : 1" in line:  # training is under way on every rank
            break
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "train.py"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers
    os.kill(pids[-1], signal.SIGKILL)
    started = time.monotonic()
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) != 0
    assert time.monotonic() - started < 90  # ended, not hung
    assert "Signal 9 (SIGKILL)" in out or "SIGKILL" in out, out[-3000:]


def test_preemption_as_a_scheduler_delivers_it_saves_once_and_leaves_a_marker(tmp_path):
    """SIGTERM to every worker, then torchrun's own forwarded SIGTERM a moment later (SLURM with
    cgroup tracking): the workers still agree on a step, rank 0 saves, and preempted.json tells a job
    script that this exit 1 of torchrun was a preemption."""
    save_dir = tmp_path / "saved"
    out = preempt_as_a_scheduler(*training_into_epoch_2(save_dir, "s"))
    run = Run(save_dir, "s")
    marker = json.loads((run.model_dir / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and "-step" in marker["checkpoint"], out[-3000:]
    assert run.checkpoint(marker["checkpoint"])["trainer"]["batches_done"] > 0
    assert out.count("Stopped by SIGTERM") == 1, out[-3000:]  # rank 0 only


NAN_DIGITS = '''from data_loader.datasets import DigitsDataset


class DigitsWithNaN(DigitsDataset):
    def __init__(self, root="data/"):
        super().__init__(root)
        self.tensors[0][1] = float("nan")  # unshuffled and unsplit: in rank 1's first batch only
'''


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step_with_one_line(tmp_path):
    project = tmp_path / "project"
    assert_ok(run_script("new_project.py", project))
    (project / "data_loader" / "nan_digits.py").write_text(NAN_DIGITS)
    result = torchrun("-c", "config.json", "--run-id", "n", f"trainer.save_dir={tmp_path / 'saved'}",
                      "data_loader.dataset.type=DigitsWithNaN", "data_loader.shuffle=false", "trainer.log_step=1",
                      "data_loader.validation_split=0", "data_loader.test_split=0", "trainer.monitor=off", *FAST,
                      cwd=project)
    assert result.returncode != 0
    # each rank's one line, at the same step (counted in the text: two processes' writes may share a line)
    assert result.stderr.count("error: ") == result.stderr.count(
        "error: non-finite training loss in epoch 1, at or before step 1 (") == 2, result.stderr[-3000:]
    assert "Connection closed" not in result.stderr and "Traceback" not in result.stderr.split("error: ")[0]
    assert "non-finite training loss" in (Run(tmp_path / "saved", "n").log_dir / "info.log").read_text()
