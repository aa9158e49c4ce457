"""Training runs on the digits data: output layout, metrics.csv, TensorBoard, best model, early
stopping, weighted averages, determinism, worker processes, iteration-based epochs, dry runs."""

import re

import pytest
import torch
import torch.nn.functional as F

import train as train_script
from base import BaseDataLoader
from base.base_metric import metric_object
from conftest import (CSV_COLUMNS, N_TEST, N_VALID, ROOT, STEPS_PER_EPOCH, assert_ok, assert_same, call_main,
                      digits_datasets, parse_config, read_json, run_train, train, tree, without_time)
from model.loss import nll_loss
from model.metric import MacroF1, accuracy, top_k_acc
from model.model import LinearModel
from trainer import Trainer

FAST = "trainer.tensorboard=false"  # for runs whose TensorBoard output no test reads


def digits_split(seed=1):
    """(train, valid) TensorDatasets of config.json's split."""
    sets = digits_datasets(seed=seed)
    return sets["train"], sets["valid"]


# ---- what a plain run writes ------------------------------------------------------------------

def test_run_writes_the_documented_layout(digits_run):
    names = tree(digits_run.save_dir)
    events = [n for n in names if n.startswith("log/Digits_CNN/r1/events.out.tfevents.")]
    assert len(events) == 1
    assert names == {"models", "models/Digits_CNN", "models/Digits_CNN/r1", "log", "log/Digits_CNN",
                     "log/Digits_CNN/r1",
                     # save_period is 5 in config.json: of 3 epochs only the last one is kept (epochs
                     # 1 and 2 were rolling checkpoints, each deleted when the next was written)
                     "models/Digits_CNN/r1/config.json", "models/Digits_CNN/r1/checkpoint-epoch3.pth",
                     "models/Digits_CNN/r1/.lock",
                     "models/Digits_CNN/r1/model_best.pth",
                     "log/Digits_CNN/r1/info.log", "log/Digits_CNN/r1/metrics.csv", *events}


def test_metrics_csv_has_one_row_per_epoch(digits_run):
    rows = digits_run.metrics()
    assert list(rows[0]) == CSV_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert float(row["lr"]) == 0.002
        assert float(row["epoch_seconds"]) > 0 and float(row["samples_per_second"]) > 0
        for key in ("accuracy", "top_k_acc", "val_accuracy", "val_top_k_acc"):
            assert 0 <= float(row[key]) <= 1
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # it learns
    assert float(rows[-1]["val_accuracy"]) > 0.8


def test_saved_config_is_the_resolved_config(digits_run):
    saved = read_json(digits_run.model_dir / "config.json")
    expected = parse_config("trainer.epochs=3", f"trainer.save_dir={digits_run.save_dir}").config
    assert saved == expected
    # defaults that config.json leaves out are written down
    assert saved["trainer"]["len_epoch"] is None
    assert saved["lr_scheduler"]["interval"] == "epoch"
    assert saved["trainer"]["epochs"] == 3
    assert saved["trainer"]["type"] == "Trainer" and saved["callbacks"] == [{"type": "InputImages", "args": {}}]
    assert saved["data_loader"]["valid_dataset"] is None and saved["data_loader"]["train_transform"] == []


def test_info_log_records_the_run(digits_run):
    text = (digits_run.log_dir / "info.log").read_text()
    assert "Run r1" in text
    assert text.count("val_accuracy") >= 3


def test_model_best_follows_the_monitored_metric(digits_run):
    """monitor is 'max val_accuracy' and save_period (5) exceeds the epochs (3): model_best.pth is
    still written at every improvement, and holds the last improving epoch."""
    values = [float(r["val_accuracy"]) for r in digits_run.metrics()]
    improving = [i + 1 for i, v in enumerate(values) if all(v > w for w in values[:i])]
    best = digits_run.checkpoint("model_best.pth")
    assert best["epoch"] == improving[-1]
    assert best["trainer"]["monitor_best"] == max(values)
    log = (digits_run.log_dir / "info.log").read_text()
    saves = re.findall(r"Saved (\S+\.pth(?: and \S+\.pth)*)$", log, flags=re.M)
    # one save per improving epoch, plus the last epoch's checkpoint, which shares a line with a best
    assert sum("model_best.pth" in line for line in saves) == len(improving)
    assert saves[-1] == ("checkpoint-epoch3.pth and model_best.pth" if improving[-1] == 3 else "checkpoint-epoch3.pth")


def test_tensorboard_events_read_back(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(digits_run.log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in ("loss", "accuracy", "top_k_acc"):
        assert f"{name}/train" in tags["scalars"] and f"{name}/valid" in tags["scalars"]
    assert {"optimizer/lr", "time/samples_per_second", "time/epoch_seconds", "loss/train_step"} <= set(tags["scalars"])

    rows = digits_run.metrics()
    steps = [STEPS_PER_EPOCH * e for e in (1, 2, 3)]  # the x axis is the optimizer step
    for tag, column in (("loss/train", "loss"), ("accuracy/valid", "val_accuracy"), ("optimizer/lr", "lr")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == steps
        assert [e.value for e in events] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)

    images = acc.Images("inputs/train")
    assert [i.step for i in images] == steps
    assert images[0].encoded_image_string.startswith(b"\x89PNG")


# ---- best model and early stopping ------------------------------------------------------------

def test_early_stop_and_best_model_with_a_flat_metric(tmp_path):
    """With lr 0 the weights never change, so val_loss is the same every epoch: epoch 1 improves on
    +inf, epochs 2 and 3 do not, and early_stop=2 ends the run after epoch 3."""
    run = train(tmp_path / "saved", "optimizer.args.lr=0.0", "trainer.monitor=min val_loss", "trainer.early_stop=2",
                "trainer.epochs=10", "trainer.save_period=100", FAST)
    rows = run.metrics()
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert len({r["val_loss"] for r in rows}) == 1
    assert run.pth_files() == {"model_best.pth", "checkpoint-epoch3.pth"}  # best at epoch 1; the last epoch
    best, last = run.checkpoint("model_best.pth"), run.checkpoint("checkpoint-epoch3.pth")
    assert best["epoch"] == 1 and best["trainer"]["not_improved_count"] == 0
    assert best["trainer"]["monitor_best"] == float(rows[0]["val_loss"])
    assert last["epoch"] == 3 and last["trainer"]["not_improved_count"] == 2

    # A run that stopped early stays stopped when resumed, even with more epochs allowed.
    before = (run.model_dir / "checkpoint-epoch3.pth").read_bytes()
    call_main(train_script.main, ["-r", run.model_dir, "trainer.epochs=20"])
    assert len(run.metrics()) == 3
    assert run.pth_files() == {"model_best.pth", "checkpoint-epoch3.pth"}
    assert (run.model_dir / "checkpoint-epoch3.pth").read_bytes() == before


def test_save_period_and_iteration_based_epochs(tmp_path):
    """len_epoch=5: every epoch is exactly 5 optimizer steps; save_period=2 saves epochs 2 and 4,
    and the last epoch (5) is always saved. The lr column shows the lr each epoch trained with.
    Resuming mid-pass over the data (and mid-schedule) gives the same weights."""
    schedule = ["lr_scheduler.args.step_size=2", "lr_scheduler.args.gamma=0.5"]
    run = train(tmp_path / "saved", "trainer.len_epoch=5", "trainer.epochs=5", "trainer.save_period=2", FAST,
                *schedule, run_id="straight")
    assert run.pth_files() - {"model_best.pth"} == {"checkpoint-epoch2.pth", "checkpoint-epoch4.pth",
                                                    "checkpoint-epoch5.pth"}
    for epoch in (2, 4, 5):
        checkpoint = run.checkpoint(f"checkpoint-epoch{epoch}.pth")
        assert checkpoint["epoch"] == epoch
        assert checkpoint["trainer"]["global_step"] == 5 * epoch
        assert all(s["step"] == 5 * epoch for s in checkpoint["optimizer"]["state"].values())
    assert [int(r["epoch"]) for r in run.metrics()] == [1, 2, 3, 4, 5]
    assert [float(r["lr"]) for r in run.metrics()] == [0.002, 0.002, 0.001, 0.001, 0.0005]

    # 2 epochs, then resumed to 5: epoch 3 starts at batch 10 of the first pass, as in the straight run
    part = train(tmp_path / "saved", "trainer.len_epoch=5", "trainer.epochs=2", FAST, *schedule, run_id="part")
    call_main(train_script.main, ["-r", part.model_dir, "trainer.epochs=5"])
    assert_same(part.checkpoint("checkpoint-epoch5.pth")["model"], run.checkpoint("checkpoint-epoch5.pth")["model"])
    assert without_time(part.metrics()) == without_time(run.metrics())


# ---- averages weighted by batch size ----------------------------------------------------------

def test_evaluate_weights_each_batch_by_its_size(tmp_path):
    """Trainer.evaluate over uneven batches gives the per-sample means over all of them, and a Metric
    (MacroF1) its value from the whole set's confusion matrix, not a mean of per-batch values."""
    torch.manual_seed(0)
    model = LinearModel()
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    sizes = [1, 7, 32]
    batches = list(zip(x.split(sizes), y.split(sizes)))
    metrics = {"accuracy": metric_object(accuracy), "top_k_acc": metric_object(top_k_acc),
               "macro_f1": metric_object(MacroF1())}
    trainer = Trainer(model, nll_loss, metrics, None, parse_config(f"trainer.save_dir={tmp_path}"),
                      torch.device("cpu"))
    result = trainer.evaluate(batches, desc="test")
    assert not model.training  # evaluation runs in eval mode

    with torch.no_grad():
        out = model(x).double()
    pred = out.argmax(1)
    f1 = [2 * ((pred == c) & (y == c)).sum().item() / ((pred == c).sum() + (y == c).sum()).item()
          for c in range(10) if ((pred == c) | (y == c)).any()]
    exact = {"loss": F.nll_loss(out, y).item(), "accuracy": (pred == y).double().mean().item(),
             "top_k_acc": (out.topk(3, dim=1).indices == y[:, None]).any(1).double().mean().item(),
             "macro_f1": sum(f1) / len(f1)}
    per_batch_loss = [F.nll_loss(out[i:i + n], y[i:i + n]).item() for i, n in zip((0, 1, 8), sizes)]
    assert abs(sum(per_batch_loss) / 3 - exact["loss"]) > 1e-3  # an unweighted mean would be wrong
    assert set(result) == set(exact)
    assert result["loss"] == pytest.approx(exact["loss"], rel=1e-6)
    for key in ("accuracy", "top_k_acc", "macro_f1"):
        assert result[key] == pytest.approx(exact[key], abs=1e-6), key


def test_epoch_averages_are_exact_per_sample_means(tmp_path):
    """The training set's last batch has 9 samples, not 32. With lr 0 the weights stay as
    initialised (and saved), so the epoch's training loss must be the per-sample mean over the
    whole training set under those weights; the same for the validation split."""
    run = train(tmp_path / "saved", "arch.type=LinearModel", "optimizer.args.lr=0.0", "trainer.epochs=1", FAST)
    model = LinearModel()
    model.load_state_dict(run.checkpoint("checkpoint-epoch1.pth")["model"])
    (row,) = run.metrics()
    train_set, valid_set = digits_split()
    assert len(train_set) % 32 == 9 and len(valid_set) == N_VALID
    with torch.no_grad():
        for prefix, dataset in (("", train_set), ("val_", valid_set)):
            x, y = dataset.tensors
            out = model(x).double()
            assert float(row[prefix + "loss"]) == pytest.approx(F.nll_loss(out, y).item(), rel=1e-5)
            assert float(row[prefix + "accuracy"]) == pytest.approx((out.argmax(1) == y).double().mean().item(),
                                                                    abs=1e-6)


# ---- reproducibility --------------------------------------------------------------------------

def test_same_seed_same_run(tmp_path):
    a = train(tmp_path / "saved", "trainer.epochs=2", FAST, run_id="a")
    b = train(tmp_path / "saved", "trainer.epochs=2", FAST, run_id="b")
    c = train(tmp_path / "saved", "trainer.epochs=2", "seed=2", FAST, run_id="c")
    assert without_time(a.metrics()) == without_time(b.metrics())
    ca, cb = a.checkpoint("checkpoint-epoch2.pth"), b.checkpoint("checkpoint-epoch2.pth")
    for key in ("model", "optimizer", "lr_scheduler", "trainer", "rng"):
        assert_same(ca[key], cb[key], key)
    # and the seed matters
    cc = c.checkpoint("checkpoint-epoch2.pth")
    assert not all(torch.equal(ca["model"][k], cc["model"][k]) for k in ca["model"])


def test_worker_processes_give_the_same_batches():
    """num_workers > 0 goes through torch's DataLoader; num_workers=0 indexes the tensors directly."""
    sets = digits_datasets()
    plain = BaseDataLoader(sets["train"], 32, shuffle=True, num_workers=0, seed=1)
    workers = BaseDataLoader(sets["train"], 32, shuffle=True, num_workers=2, seed=1)
    assert workers._loader is not None and plain._loader is None  # the two paths under test really differ
    for epoch, start in ((0, 0), (1, 0), (1, 30)):
        plain.set_epoch(epoch, start), workers.set_epoch(epoch, start)
        got, want = list(workers), list(plain)
        assert len(got) == len(want) == STEPS_PER_EPOCH - start
        for (x1, y1), (x2, y2) in zip(got, want):
            assert x1.dtype == x2.dtype and torch.equal(x1, x2) and torch.equal(y1, y2)
    plain.set_epoch(0)
    epoch0 = next(iter(plain))[1]
    plain.set_epoch(1)
    assert not torch.equal(epoch0, next(iter(plain))[1])  # each epoch has its own order
    for phase, n in (("valid", N_VALID), ("test", N_TEST)):
        plain = BaseDataLoader(sets[phase], 32, even_shards=False, num_workers=0, seed=1)
        workers = BaseDataLoader(sets[phase], 32, even_shards=False, num_workers=2, seed=1)
        got, want = list(workers), list(plain)
        assert len(got) == len(want) == 9  # 270 samples, in a fixed order
        assert torch.equal(torch.cat([y for _, y in want]), sets[phase].tensors[1])  # every sample once, in order
        for (x1, y1), (x2, y2) in zip(got, want):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_training_with_worker_processes_matches_in_process_loading(tmp_path):
    a = train(tmp_path / "saved", "trainer.epochs=2", "data_loader.num_workers=2", FAST, run_id="workers")
    b = train(tmp_path / "saved", "trainer.epochs=2", FAST, run_id="plain")
    assert without_time(a.metrics()) == without_time(b.metrics())
    assert_same(a.checkpoint("checkpoint-epoch2.pth")["model"], b.checkpoint("checkpoint-epoch2.pth")["model"])


# ---- dry run ----------------------------------------------------------------------------------

def test_dry_run_writes_nothing(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_train("-c", ROOT / "config.json", "--dry-run", f"trainer.save_dir={tmp_path / 'saved'}",
                       f"data_loader.dataset.args.root={ROOT / 'data'}", cwd=cwd)
    assert_ok(result)
    assert "dry run" in result.stdout
    assert not (tmp_path / "saved").exists()
    assert list(cwd.iterdir()) == []  # no stray runs/ or logs in the working directory either
