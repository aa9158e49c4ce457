"""Edge cases a review found: each once crashed, hung or lost precision."""
import subprocess
import sys

import torch

import train as train_script
from conftest import ROOT, THREADS_ENV, Run, assert_ok, main_error, train

FAST = ["trainer.tensorboard=false", "trainer.verbosity=1"]


def test_an_epoch_scheduler_runs_without_a_monitor(tmp_path):
    run = train(tmp_path / "saved", "trainer.monitor=off", "trainer.early_stop=0", "trainer.epochs=2",
                "lr_scheduler.args.step_size=1", *FAST)
    assert [float(r["lr"]) for r in run.metrics()] == [0.002, 0.001]


def test_a_val_monitor_with_an_empty_validation_split_is_one_line(tmp_path, capsys):
    # 1797 * 0.0001 rounds to no validation sample at all
    code, err = main_error(train_script.main, ["-c", "config.json", "data_loader.validation_split=0.0001",
                                               f"trainer.save_dir={tmp_path / 'saved'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "trainer.monitor: val_accuracy needs validation data" in err
    assert not (tmp_path / "saved").exists()


def test_a_loss_that_cannot_be_called_is_one_line(tmp_path, capsys):
    code, err = main_error(train_script.main, ["-c", "config.json", f"trainer.save_dir={tmp_path / 'saved'}",
                                               'loss={"type": "torchvision.datasets.FakeData", "args": {"size": 1}}'],
                           capsys)
    assert code == 2 and err.startswith("error: loss: FakeData is not callable"), err


def test_metric_names_the_trainer_writes_itself_are_refused(tmp_path, capsys):
    for name in ("loss", "lr", "epoch", "val_accuracy"):
        code, err = main_error(train_script.main, ["-c", "config.json", f"trainer.save_dir={tmp_path / 'saved'}",
                                                   f'metrics=[{{"type": "accuracy", "name": "{name}"}}]',
                                                   "trainer.monitor=off"], capsys)
        assert code == 2 and f"metrics: '{name}' is a name the trainer logs itself" in err, err


def test_batch_mean_counts_stay_exact_beyond_float32(tmp_path):
    from base.base_metric import BatchMean
    mean = BatchMean(lambda output, target: output.mean())
    mean.update(torch.ones(3), torch.zeros(3))
    mean.count = 2 ** 24 + 1  # float32 would round this to 2**24
    sums = mean.sums
    mean.sums = sums  # the round trip a mid-epoch checkpoint makes
    assert sums.dtype == torch.float64 and mean.count == 2 ** 24 + 1 and mean.total.dtype == torch.float32


def test_ddp_validation_with_batchnorm_and_a_process_without_validation_data(tmp_path):
    """One validation sample for two processes, and a model with BatchNorm buffers: evaluation must not
    run DDP's buffer broadcast on one process only (that hung until torchrun gave up)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "-c", "config.json", "--run-id", "bn", "arch.type=torchvision.models.mobilenet_v3_small",
           'arch.args={"num_classes": 10}', "loss=cross_entropy", 'data_loader.train_transform=[{"type": "RGB"}]',
           'data_loader.eval_transform=[{"type": "RGB"}]', "data_loader.validation_split=0.0006",
           "trainer.len_epoch=2", "trainer.epochs=1", f"trainer.save_dir={tmp_path / 'saved'}", *FAST]
    result = subprocess.run(cmd, cwd=ROOT, env=THREADS_ENV, capture_output=True, text=True, timeout=120)
    assert_ok(result)
    assert "Data: 1526 training, 1 validation samples" in result.stdout
    run = Run(tmp_path / "saved", "bn")
    assert [r["epoch"] for r in run.metrics()] == ["1"]
