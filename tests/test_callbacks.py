"""Extension points: callbacks with state (in every checkpoint, resumed bitwise), the shipped EMA and input
grid, warmup + cosine schedules in the config, a Trainer class per run, modules a project allows."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import (THREADS_ENV, Run, assert_ok, assert_same_run, assert_user_error, read_csv, run_script,
                      without_time)

FAST = ["trainer.tensorboard=false", "trainer.verbosity=1"]
COUNTER = '''
import torch


class StepCounter:
    """Counts optimizer steps and the loss sum (state), adds them to the log, writes to TensorBoard."""
    logs = ("steps_seen",)

    def __init__(self, scale=1.0):
        self.scale, self.steps, self.loss_sum, self.events = scale, 0, 0.0, []

    def on_train_start(self, trainer):
        self.events.append("start")

    def on_step_end(self, trainer, batch, loss):
        self.steps += 1
        self.loss_sum += float(loss) * self.scale

    def on_epoch_end(self, trainer, epoch, log):
        log["steps_seen"] = float(self.steps)
        trainer.tensorboard("scalar", "custom/loss_sum", self.loss_sum)
        trainer.tensorboard("text", "custom/note", f"epoch {epoch}")

    def on_train_end(self, trainer):
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        path = f"{trainer.cfg['save_dir']}/ended-rank{rank}"
        open(path, "w").write(" ".join(self.events + ["end"]))

    def state_dict(self):
        return {"steps": self.steps, "loss_sum": self.loss_sum}

    def load_state_dict(self, state):
        self.steps, self.loss_sum = state["steps"], state["loss_sum"]
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the template with a stateful callback of its own."""
    root = tmp_path_factory.mktemp("callbacks") / "project"
    assert_ok(run_script("new_project.py", root))
    (root / "callbacks" / "counter.py").write_text(COUNTER)
    return root


def train_in(project, *args):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=project, capture_output=True, text=True,
                          timeout=300, env=THREADS_ENV)


CALLBACKS = 'callbacks=[{"type": "StepCounter"}, {"type": "EMA", "args": {"decay": 0.9}}, {"type": "InputImages"}]'


@pytest.fixture(scope="module")
def straight(project, tmp_path_factory):
    """2 epochs with the counter and EMA, mid-epoch checkpoints every 15 steps."""
    save_dir = tmp_path_factory.mktemp("straight") / "saved"
    args = ["-c", "config.json", "--run-id", "s", f"trainer.save_dir={save_dir}", "trainer.epochs=2",
            "trainer.save_every_steps=15", CALLBACKS, "trainer.monitor=max val_ema_accuracy", "trainer.verbosity=1"]
    result = train_in(project, *args)
    assert_ok(result)
    run = Run(save_dir, "s")
    run.args, run.result = args, result
    return run


def test_callbacks_add_to_the_log_and_write_tensorboard(straight):
    rows = read_csv(straight.log_dir / "metrics.csv")
    assert [float(r["steps_seen"]) for r in rows] == [40.0, 80.0]  # 40 steps an epoch
    # the EMA model is validated on its own: its loss is not the trained model's
    assert all(0 <= float(r["val_ema_accuracy"]) <= 1 and r["val_ema_loss"] != r["val_loss"] for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(straight.log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    sums = acc.Scalars("custom/loss_sum")
    assert [s.step for s in sums] == [40, 80] and sums[1].value > sums[0].value > 0
    assert "steps_seen/train" in acc.Tags()["scalars"] and "val_ema_accuracy" not in acc.Tags()["scalars"]
    assert "ema_accuracy/valid" in acc.Tags()["scalars"]
    assert "custom/note/text_summary" in acc.Tags()["tensors"]
    assert acc.Images("inputs/train")  # the default InputImages callback of config.json
    assert (straight.save_dir / "ended-rank0").read_text() == "start end"


def test_callback_state_is_in_every_checkpoint(straight):
    middle = straight.checkpoint("checkpoint-epoch2-step45.pth")
    assert middle["callbacks"]["step_counter"]["steps"] == 45
    ema = middle["callbacks"]["ema"]["weights"]
    assert set(ema) == set(middle["model"]) and not torch.equal(ema["fc2.weight"], middle["model"]["fc2.weight"])
    best = straight.checkpoint()
    rows = read_csv(straight.log_dir / "metrics.csv")
    best_epoch = max(range(2), key=lambda i: float(rows[i]["val_ema_accuracy"])) + 1
    assert best["epoch"] == best_epoch  # the monitor followed the callback's value


@pytest.mark.parametrize("step", [15, 45])
def test_resume_mid_epoch_with_stateful_callbacks_is_bitwise(project, straight, tmp_path, step):
    resumed = Run(tmp_path / "saved", "s")
    shutil.copytree(straight.save_dir, resumed.save_dir)
    (resumed.model_dir / "checkpoint-epoch2.pth").unlink()
    assert_ok(train_in(project, "-r", resumed.model_dir / f"checkpoint-epoch{step // 40 + 1}-step{step}.pth"))
    assert_same_run(straight, resumed, "checkpoint-epoch2.pth")  # callbacks' state included
    assert resumed.checkpoint("checkpoint-epoch2.pth")["callbacks"]["step_counter"]["steps"] == 80


def test_weights_ema_for_test_export_and_predict(project, straight, tmp_path):
    run = Run(tmp_path / "saved", "s")
    shutil.copytree(straight.save_dir, run.save_dir)
    ck = run.model_dir / "checkpoint-epoch2.pth"
    results = {}
    for weights in ("model", "ema"):
        assert_ok(subprocess.run([sys.executable, "test.py", "-r", ck, "--weights", weights], cwd=project,
                                 capture_output=True, text=True, env=THREADS_ENV))
        results[weights] = json.loads((run.model_dir / "test_metrics.json").read_text())
    assert results["ema"]["weights"] == "ema" and results["ema"]["loss"] != results["model"]["loss"]
    # the EMA weights evaluated by hand give test.py's loss
    from conftest import digits_datasets
    from model.model import DigitsModel
    ema = DigitsModel().eval()
    ema.load_state_dict(run.checkpoint("checkpoint-epoch2.pth")["callbacks"]["ema"]["weights"])
    x, y = digits_datasets()["test"].tensors
    with torch.no_grad():
        loss = torch.nn.functional.nll_loss(ema(x), y).item()
    assert math.isclose(loss, results["ema"]["loss"], rel_tol=1e-5)  # float32 sums in other batch sizes
    out = subprocess.run([sys.executable, "test.py", "-r", ck, "--weights", "swa"], cwd=project,
                         capture_output=True, text=True, env=THREADS_ENV)
    assert_user_error(out, "no weights 'swa'", "it has: model, ema")
    exported = subprocess.run([sys.executable, "export.py", "-r", ck, "--weights", "ema", "--format", "torchscript"],
                              cwd=project, capture_output=True, text=True, env=THREADS_ENV)
    assert_ok(exported)
    assert json.loads((run.model_dir / "model.json").read_text())["weights"] == "ema"
    predicted = subprocess.run([sys.executable, "predict.py", "-r", ck, "--weights", "ema"], cwd=project,
                               capture_output=True, text=True, env=THREADS_ENV)
    assert_ok(predicted)
    accuracy = float(predicted.stdout.split("Accuracy against the targets: ")[1].split()[0])
    assert abs(accuracy - results["ema"]["accuracy"]) < 1e-4  # the same 270 test samples, the same weights


def test_callbacks_run_on_every_process_under_torchrun(project, tmp_path):
    save_dir = tmp_path / "saved"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "-c",
           "config.json", "--run-id", "d", f"trainer.save_dir={save_dir}", "trainer.epochs=1", CALLBACKS, *FAST]
    assert_ok(subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=300, env=THREADS_ENV))
    assert (save_dir / "ended-rank0").read_text() == (save_dir / "ended-rank1").read_text() == "start end"
    ck = torch.load(save_dir / "models" / "Digits_CNN" / "d" / "checkpoint-epoch1.pth", weights_only=True)
    assert ck["callbacks"]["step_counter"]["steps"] == 20  # 40 batches split between 2 processes


def test_a_monitor_no_callback_declares_is_refused_before_training(project, tmp_path):
    out = train_in(project, "-c", "config.json", f"trainer.save_dir={tmp_path}", CALLBACKS,
                   "trainer.monitor=max val_emma_accuracy")
    assert_user_error(out, "trainer.monitor", "val_ema_accuracy", "steps_seen")
    assert not tmp_path.joinpath("models").exists()


WARMUP = ('lr_scheduler={"type": "SequentialLR", "interval": "step", "args": {"milestones": [10], "schedulers": ['
          '{"type": "LinearLR", "args": {"start_factor": 0.1, "total_iters": 10}}, '
          '{"type": "CosineAnnealingLR", "args": {"T_max": 110}}]}}')


def test_warmup_then_cosine_per_step_from_the_config(tmp_path):
    from conftest import train
    run = train(tmp_path / "saved", WARMUP, "trainer.epochs=3", "optimizer.args.lr=0.01", *FAST)
    rows = run.metrics()
    # the lr logged at each epoch's end is the one the next step takes: after steps 40, 80, 120 (10 of warmup)
    expected = [0.01 * (1 + math.cos(math.pi * (s - 10) / 110)) / 2 for s in (40, 80, 120)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_warmup_then_cosine_resumes_mid_epoch_bitwise(tmp_path):
    from conftest import train
    straight = train(tmp_path / "a", WARMUP, "trainer.epochs=2", "trainer.save_every_steps=5", *FAST)
    resumed = Run(tmp_path / "b", "run")
    shutil.copytree(straight.save_dir, resumed.save_dir)
    (resumed.model_dir / "checkpoint-epoch2.pth").unlink()
    assert_ok(run_script("train.py", "-r", resumed.model_dir / "checkpoint-epoch1-step5.pth"))
    assert_same_run(straight, resumed, "checkpoint-epoch2.pth")


@pytest.mark.parametrize("bad, fragment", [
    ('{"type": "SequentialLR", "args": {"milestones": [10], "schedulers": [{"type": "LinearLR", "args": '
     '{"warmup": 3}}]}}', "lr_scheduler.args.schedulers[0].args"),
    ('{"type": "SequentialLR", "args": {"milestones": [10, 20], "schedulers": ["LinearLR", "ConstantLR"]}}',
     "lr_scheduler.args: "),
    ('{"type": "SequentialLR", "args": {"milestones": [10], "schedulers": ["LinearLR", "Cosine"]}}',
     "lr_scheduler.args.schedulers[1]"),
])
def test_a_bad_chain_of_schedulers_is_one_line(tmp_path, bad, fragment):
    out = run_script("train.py", "-c", "config.json", f"trainer.save_dir={tmp_path}", f"lr_scheduler={bad}")
    assert_user_error(out, fragment)
    assert not any(tmp_path.iterdir())


DICT_TRAINER = '''
from base import BaseTrainer


class DictTrainer(BaseTrainer):
    def step(self, batch):
        output = self.model(batch["x"])
        return self.criterion(output, batch["y"]), output, batch["y"]
'''
DICT_DATA = '''
from torch.utils.data import Dataset

from data_loader.datasets import DigitsDataset


class DictDigits(Dataset):
    def __init__(self, root="data/"):
        self.x, self.y = DigitsDataset(root).tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}
'''


def test_each_run_keeps_its_trainer_class(project, tmp_path):
    """A tuple-batch run and a dict-batch run of one project: test.py uses each run's own Trainer."""
    (project / "trainer" / "dict_trainer.py").write_text(DICT_TRAINER)
    (project / "data_loader" / "dict_digits.py").write_text(DICT_DATA)
    try:
        common = [f"trainer.save_dir={tmp_path}", "trainer.epochs=1", *FAST]
        assert_ok(train_in(project, "-c", "config.json", "--run-id", "tuples", *common))
        assert_ok(train_in(project, "-c", "config.json", "--run-id", "dicts", "trainer.type=DictTrainer",
                           "data_loader.dataset.type=DictDigits", *common))
        for run_id in ("tuples", "dicts"):
            out = subprocess.run([sys.executable, "test.py", "-r", tmp_path / "models" / "Digits_CNN" / run_id],
                                 cwd=project, capture_output=True, text=True, env=THREADS_ENV)
            assert_ok(out)
            saved = json.loads((tmp_path / "models" / "Digits_CNN" / run_id / "test_metrics.json").read_text())
            assert saved["n_samples"] == 270 and saved["accuracy"] > 0.5
        bad = train_in(project, "-c", "config.json", *common, "trainer.type=DictDigits")
        assert_user_error(bad, "trainer.type: DictDigits is not a BaseTrainer subclass")
    finally:
        (project / "trainer" / "dict_trainer.py").unlink()
        (project / "data_loader" / "dict_digits.py").unlink()


def test_a_project_allows_modules_in_its_own_file(project, tmp_path):
    arch = 'arch={"type": "torchvision.ops.MLP", "args": {"in_channels": 64, "hidden_channels": [32, 10]}}'
    common = ["-c", "config.json", f"trainer.save_dir={tmp_path}", "trainer.epochs=1", arch, "loss=cross_entropy",
              *FAST]
    refused = train_in(project, *common)
    assert_user_error(refused, "arch.type: unknown name 'torchvision.ops.MLP'")
    allowed = project / "allowed_modules.txt"
    try:
        allowed.write_text("# modules this project's configs may name\ntorchvision.ops\n")
        (project / "data_loader" / "flat_digits.py").write_text(
            "from torch.utils.data import TensorDataset\n\nfrom data_loader.datasets import DigitsDataset\n\n\n"
            "def FlatDigits(root='data/'):\n    x, y = DigitsDataset(root).tensors\n"
            "    return TensorDataset(x.flatten(1), y)\n")
        out = train_in(project, *common, "data_loader.dataset.type=FlatDigits", "--run-id", "mlp")
        assert_ok(out)
        assert "MLP(" in out.stdout + out.stderr
        allowed.write_text("torchvision.ops\nnot a module\n")
        assert_user_error(train_in(project, *common), "allowed_modules.txt:2: 'not a module' is not a module name")
        allowed.write_text("no_such_module_here\n")
        assert_user_error(train_in(project, *common, 'arch={"type": "no_such_module_here.Net"}'),
                          "cannot import no_such_module_here")
    finally:
        allowed.unlink(missing_ok=True)
        (project / "data_loader" / "flat_digits.py").unlink(missing_ok=True)


def test_the_end_of_training_is_summarized_and_a_missing_gpu_is_a_warning(straight):
    output = straight.result.stdout + straight.result.stderr
    assert "n_gpu is 1 in the config, but no GPU is available: running on the CPU." in output
    lines = output.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("Finished at epoch 2 in "))
    assert lines[end].endswith("; last checkpoint: " + str(straight.model_dir / "checkpoint-epoch2.pth"))
    best = straight.checkpoint()
    assert lines[end + 1] == f"Best val_ema_accuracy: {best['trainer']['monitor_best']:.6g}, epoch {best['epoch']}: " \
        f"{straight.model_dir / 'model_best.pth'}"


def test_a_callback_method_that_is_no_event_is_refused(project, tmp_path):
    (project / "callbacks" / "typo.py").write_text("class Typo:\n    def on_epoch_ends(self, trainer, epoch, log):\n"
                                                    "        log['never'] = 1.0\n")
    try:
        out = train_in(project, "-c", "config.json", f"trainer.save_dir={tmp_path}", 'callbacks=[{"type": "Typo"}]')
        assert_user_error(out, "callbacks[0]: Typo.on_epoch_ends is not one of on_train_start, on_step_end")
        assert not any(tmp_path.iterdir())
    finally:
        (project / "callbacks" / "typo.py").unlink()


def test_review_cases_one_line_each(project, tmp_path):
    """A non-dict lr_scheduler.args, --weights on an exported model, a dry run with the EMA, a scheduler whose
    first parameter is not called optimizer, and damaged EMA weights in a checkpoint."""
    common = ["-c", "config.json", f"trainer.save_dir={tmp_path}", *FAST]
    assert_user_error(train_in(project, *common, 'lr_scheduler={"type": "StepLR", "args": [10]}'),
                      "lr_scheduler.args: expected dict")
    dry = train_in(project, *common, "--dry-run", 'callbacks=[{"type": "EMA"}]', "trainer.monitor=max val_ema_accuracy")
    assert_ok(dry)
    (project / "model" / "half.py").write_text("from torch.optim.lr_scheduler import LambdaLR\n\n\nclass HalfLR(LambdaLR):\n"
                                               "    def __init__(self, opt, factor=0.5):\n"
                                               "        super().__init__(opt, lambda epoch: factor ** epoch)\n")
    try:
        assert_ok(train_in(project, *common, "--dry-run", 'lr_scheduler={"type": "HalfLR"}'))
    finally:
        (project / "model" / "half.py").unlink()
    assert_ok(train_in(project, *common, "--run-id", "e", "trainer.epochs=1", 'callbacks=[{"type": "EMA"}]'))
    run = Run(tmp_path, "e")
    ck = torch.load(run.model_dir / "checkpoint-epoch1.pth", weights_only=True)
    ck["callbacks"]["ema"]["weights"]["fc2.weight"] = torch.zeros(3, 3)
    torch.save(ck, run.model_dir / "checkpoint-epoch1.pth")
    before = sorted(p.name for p in run.model_dir.rglob("*"))
    out = train_in(project, "-r", run.model_dir / "checkpoint-epoch1.pth", "trainer.epochs=2")
    assert_user_error(out, "the EMA weights do not fit the model")
    assert sorted(p.name for p in run.model_dir.rglob("*")) == before  # nothing superseded or written
    assert_ok(subprocess.run([sys.executable, "export.py", "-r", run.model_dir / "checkpoint-epoch1.pth", "--format",
                              "torchscript"], cwd=project, capture_output=True, text=True, env=THREADS_ENV))
    out = subprocess.run([sys.executable, "predict.py", "-r", run.model_dir / "model.ts", "--weights", "ema"],
                         cwd=project, capture_output=True, text=True, env=THREADS_ENV)
    assert_user_error(out, "--weights ema: an exported model holds the weights it was exported with")


def test_an_fp16_run_still_exports_and_tests_on_the_cpu(tmp_path):
    """fp16 needs CUDA to train; a checkpoint of such a run is evaluated and exported in full precision."""
    from conftest import train
    run = train(tmp_path / "saved", "trainer.epochs=1", *FAST)
    ck = run.checkpoint("checkpoint-epoch1.pth")
    ck["config"]["trainer"]["amp"] = "fp16"
    torch.save(ck, run.model_dir / "checkpoint-epoch1.pth")
    assert_ok(run_script("export.py", "-r", run.model_dir / "checkpoint-epoch1.pth", "--format", "torchscript"))
    assert_ok(run_script("test.py", "-r", run.model_dir / "checkpoint-epoch1.pth"))
