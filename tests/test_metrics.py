"""Metrics are exact dataset-level values: independent of batch size, order, process count, DDP
padding and mid-epoch resumes."""
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import Run, assert_same, call_main, train, without_time

N, K = 300, 8  # samples; logit columns (class 7 is never a target nor predicted)


def fixed_data():
    """Random logits and class-sorted targets: consecutive batches hold few classes each. Class 6 is
    predicted but never a target; class 7 is neither (its logit is always the lowest)."""
    g = torch.Generator().manual_seed(1234)
    output = torch.randn(N, K, generator=g)
    output[:, 7] = -100.0
    target = torch.randint(0, 6, (N,), generator=g).sort().values
    # make the predictions agree with the targets for about half of the samples
    agree = torch.rand(N, generator=g) < 0.5
    output[agree, target[agree]] += 5.0
    return output, target


def reference_macro_f1(output, target):
    """Macro-F1 straight from the confusion matrix, over the classes that occur as a target or a prediction."""
    pred = output.argmax(1).numpy()
    cm = np.zeros((K, K), dtype=np.int64)
    np.add.at(cm, (target.numpy(), pred), 1)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = (cm.sum(0) + cm.sum(1)) > 0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def macro_f1_in_batches(output, target, batch_size, order=None):
    from model.metric import MacroF1

    metric = MacroF1()
    order = torch.arange(N) if order is None else order
    for idx in order.split(batch_size):
        metric.update(output[idx], target[idx])
    return metric.compute()


def test_macro_f1_is_exact_at_any_batch_size_and_order():
    output, target = fixed_data()
    pred = output.argmax(1)
    assert 6 in pred.tolist() and 6 not in target.tolist() and 7 not in pred.tolist()  # the data is as described
    expected = reference_macro_f1(output, target)
    values = [macro_f1_in_batches(output, target, bs) for bs in (1, 64, N)]
    values.append(macro_f1_in_batches(output, target, 64, torch.randperm(N, generator=torch.Generator().manual_seed(0))))
    values.append(macro_f1_in_batches(output, target, 37, torch.arange(N).flip(0)))
    assert values == [values[0]] * len(values)  # bitwise the same
    assert values[0] == pytest.approx(expected, abs=1e-12)
    # class 6 (predicted, never a target) counts with F1 = 0; class 7 (neither) does not count
    present_only_as_target = float(np.mean([
        2 * ((pred == c) & (target == c)).sum().item() / ((pred == c).sum().item() + (target == c).sum().item())
        for c in range(6)]))
    assert values[0] == pytest.approx(present_only_as_target * 6 / 7, abs=1e-12)

    # The test means something: the mean of per-batch F1s (class-ordered batches) is a different number.
    from model.metric import MacroF1
    per_batch = []
    for idx in torch.arange(N).split(64):
        m = MacroF1()
        m.update(output[idx], target[idx])
        per_batch.append(m.compute())
    assert abs(float(np.mean(per_batch)) - expected) > 0.01


def test_tracker_weights_function_metrics_by_batch_size():
    """accuracy (a batch mean) over uneven batches is the exact per-sample mean, and so is the loss."""
    from base.base_metric import MetricTracker, metric_object
    from model.metric import accuracy

    output, target = fixed_data()
    tracker = MetricTracker({"accuracy": metric_object(accuracy)})
    sizes = [1, 2, 7, 90, 200]
    batch_means = []
    for idx in torch.arange(N).split(sizes):
        tracker.update(F.cross_entropy(output[idx], target[idx]), output[idx], target[idx])
        batch_means.append(accuracy(output[idx], target[idx]).item())
    result = tracker.compute(torch.device("cpu"))
    exact = (output.argmax(1) == target).double().mean().item()
    assert result["accuracy"] == pytest.approx(exact, rel=1e-6)
    assert result["loss"] == pytest.approx(F.cross_entropy(output, target).item(), rel=1e-5)
    assert abs(float(np.mean(batch_means)) - exact) > 0.02  # the unweighted mean of batch means differs
    assert isinstance(tracker.metrics["accuracy"], type(tracker.metrics["loss"]))  # wrapped in BatchMean


def new_tracker():
    from base.base_metric import MetricTracker, metric_object
    from model.metric import MacroF1, accuracy
    return MetricTracker({"accuracy": metric_object(accuracy), "macro_f1": MacroF1()})


def fill(tracker, output, target, idx, batch_size):
    for part in idx.split(batch_size) if len(idx) else ():  # no samples: no batch at all
        tracker.update(F.cross_entropy(output[part], target[part]), output[part], target[part])
    return tracker


def _tracker_on_rank(rank, world, init_file, queue):
    """Under a real gloo process group: (a) each rank has every other sample, in uneven batches of
    25; (b) rank 0 has no batch at all, rank 1 has everything."""
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        output, target = fixed_data()
        cpu = torch.device("cpu")
        half = fill(new_tracker(), output, target, torch.arange(rank, N, world), 25).compute(cpu)
        mine = torch.arange(N) if rank == 1 else torch.arange(0)
        lopsided = fill(new_tracker(), output, target, mine, 25).compute(cpu)
        queue.put((rank, half, lopsided))
    finally:
        tdist.destroy_process_group()


def test_tracker_sums_metric_state_across_processes(tmp_path):
    output, target = fixed_data()
    single = fill(new_tracker(), output, target, torch.arange(N), 25).compute(torch.device("cpu"))
    assert single["macro_f1"] == pytest.approx(reference_macro_f1(output, target), abs=1e-12)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tracker_on_rank, args=(r, 2, tmp_path / "store", queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {rank: (half, lopsided) for rank, half, lopsided in (queue.get(timeout=120) for _ in procs)}
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        for got in results[rank]:  # every rank gets the all-data numbers, in both setups
            assert set(got) == {"loss", "accuracy", "macro_f1"}
            assert got["macro_f1"] == single["macro_f1"]  # integer counts: exact
            assert got["accuracy"] == pytest.approx(single["accuracy"], rel=1e-6)
            assert got["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert results[0] == results[1]
    # and a rank's own half alone is a different number (the reduction did something)
    own = fill(new_tracker(), output, target, torch.arange(0, N, 2), 25).compute(torch.device("cpu"))
    assert own["macro_f1"] != single["macro_f1"]


@pytest.mark.parametrize("n, batch_size, world_size", [(7, 2, 2), (301, 16, 2), (5, 1, 4), (1257, 32, 2)])
def test_ddp_padding_is_not_counted_in_training_metrics(n, batch_size, world_size):
    """The padding that evens out the ranks' shards is excluded: over all ranks, the tracked
    samples are each real sample exactly once."""
    from base.base_data_loader import EpochBatchSampler

    g = torch.Generator().manual_seed(n)
    output, target = torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)
    seen, counts, correct, produced = [], 0, 0.0, 0
    for rank in range(world_size):
        sampler = EpochBatchSampler(n, batch_size, shuffle=True, seed=3, rank=rank, world_size=world_size)
        sampler.epoch = 2
        batches = list(sampler)
        assert len(batches) == len(sampler)  # every rank takes as many steps
        tracker = new_tracker()
        for b, idx in enumerate(batches):
            n_real = sampler.n_real(b)
            produced += len(idx)
            seen += idx[:n_real].tolist() if n_real is not None else idx.tolist()
            tracker.update(F.cross_entropy(output[idx], target[idx]), output[idx], target[idx], n_real)
        sums = tracker.state_dict()
        counts += sums["accuracy"][1].item()
        correct += sums["accuracy"][0].item()
        assert sums["accuracy"][1].item() == sums["macro_f1"].sum().item() == sums["loss"][1].item()
    assert sorted(seen) == list(range(n))
    assert counts == n
    assert correct == pytest.approx((output.argmax(1) == target).sum().item(), abs=1e-3)
    assert produced > n  # there was padding to leave out


def test_n_real_is_none_without_padding():
    from base.base_data_loader import EpochBatchSampler

    assert EpochBatchSampler(8, 3, True, 0, rank=1, world_size=2).n_real(1) is None
    assert EpochBatchSampler(7, 3, True, 0, rank=0, world_size=1).n_real(2) is None
    # evaluation loaders do not pad: every sample counted once, uneven shards
    sampler = EpochBatchSampler(7, 3, False, 0, rank=1, world_size=2, even_shards=False)
    assert sampler.n_real(0) is None and [b.tolist() for b in sampler] == [[1, 3, 5]]


# ---- mid-epoch checkpoints hold the partial sums ----------------------------------------------

COMMON = ["trainer.tensorboard=false", "trainer.verbosity=1", 'metrics=["accuracy","MacroF1"]',
          "trainer.save_every_steps=15", "trainer.epochs=2"]


@pytest.fixture(scope="module")
def f1_run(tmp_path_factory):
    """config.json (40 steps of 32 per epoch) with accuracy and MacroF1, 2 epochs, a checkpoint every 15 steps."""
    return train(tmp_path_factory.mktemp("f1") / "saved", *COMMON, run_id="m")  # in this process


def test_mid_epoch_checkpoint_holds_the_partial_metric_sums(f1_run):
    for step in (15, 30, 45):
        middle = f1_run.checkpoint(f"checkpoint-epoch{(step - 1) // 40 + 1}-step{step}.pth")
        assert middle["metrics"] is not None and len(middle["metrics"]) == 1  # one entry per process
        (sums,) = middle["metrics"]
        assert set(sums) == {"loss", "accuracy", "macro_f1"}
        batches = step - 40 * ((step - 1) // 40)
        assert sums["loss"][1].item() == sums["accuracy"][1].item() == 32 * batches
        assert sums["macro_f1"].shape == (10, 10) and sums["macro_f1"].sum().item() == 32 * batches
    assert f1_run.checkpoint("checkpoint-epoch2.pth")["metrics"] is None  # end of epoch: nothing partial
    header = list(f1_run.metrics()[0])
    assert {"macro_f1", "val_macro_f1"} <= set(header)


def test_mid_epoch_resume_gives_the_same_metrics(f1_run, tmp_path):
    """Resumed at step 30 (inside epoch 1), the epoch-1 row includes the 30 batches before the
    checkpoint; every row and the later checkpoints are bitwise those of the uninterrupted run."""
    resumed = Run(tmp_path / "saved", "m")
    shutil.copytree(f1_run.save_dir, resumed.save_dir)
    import train as train_script
    call_main(train_script.main, ["-r", resumed.model_dir / "checkpoint-epoch1-step30.pth"])
    assert without_time(resumed.metrics()) == without_time(f1_run.metrics())
    assert [r["epoch"] for r in resumed.metrics()] == ["1", "2"]
    for name in ("checkpoint-epoch2-step45.pth", "checkpoint-epoch2-step75.pth", "checkpoint-epoch2.pth"):
        a, b = f1_run.checkpoint(name), resumed.checkpoint(name)
        for key in ("model", "optimizer", "trainer", "metrics"):
            assert_same(a[key], b[key], f"{name}: {key}")
