"""The training switches: mixed precision, gradient accumulation, clipping, torch.compile."""
import pytest
import torch

from base import BaseDataLoader
from base.base_metric import metric_object
from conftest import Run, assert_user_error, parse_config, run_train, train
from model.model import LinearModel

# LinearModel has no dropout or batch norm, so two set-ups that should compute the same thing do.
LINEAR = ["arch.type=LinearModel", "trainer.tensorboard=false", "trainer.verbosity=0", "lr_scheduler=null",
          "trainer.epochs=1", "trainer.monitor=off"]


def weights(run: Run, file):
    return run.checkpoint(file)["model"]


def test_accumulating_micro_batches_equals_one_large_batch(tmp_path):
    """4 micro-batches of 8 per step == batches of 32: the same samples (the order is a function of
    the seed), the same mean gradient, so the same weights after 6 steps."""
    sgd = ["optimizer.type=SGD", 'optimizer.args={"lr": 0.5}', "trainer.len_epoch=6"]
    big = train(tmp_path / "big", *LINEAR, *sgd, "data_loader.batch_size=32")
    small = train(tmp_path / "small", *LINEAR, *sgd, "data_loader.batch_size=8", "trainer.accumulate_steps=4")
    a, b = weights(big, "checkpoint-epoch1.pth"), weights(small, "checkpoint-epoch1.pth")
    init = weights(train(tmp_path / "init", *LINEAR, 'optimizer.type=SGD', 'optimizer.args={"lr": 0.0}',
                         "trainer.len_epoch=1"), "checkpoint-epoch1.pth")
    for key in a:
        assert not torch.equal(a[key], init[key])  # it did train
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert big.checkpoint("checkpoint-epoch1.pth")["trainer"]["global_step"] == 6
    assert small.checkpoint("checkpoint-epoch1.pth")["trainer"]["global_step"] == 6  # steps, not batches


def test_accumulation_in_an_epoch_based_run_steps_on_the_last_partial_window(tmp_path):
    run = train(tmp_path / "s", *LINEAR, "trainer.accumulate_steps=3")
    # 40 batches per pass: 13 full windows of 3 and one of 1
    assert run.checkpoint("checkpoint-epoch1.pth")["trainer"]["global_step"] == 14


def test_clip_grad_norm_bounds_the_update(tmp_path):
    """Plain SGD with lr 1 moves the weights by exactly the (clipped) gradient."""
    sgd = ["optimizer.type=SGD", "trainer.len_epoch=1"]
    init = weights(train(tmp_path / "init", *LINEAR, *sgd, 'optimizer.args={"lr": 0.0}'), "checkpoint-epoch1.pth")

    def update_norm(*extra):
        w = weights(train(tmp_path / str(len(extra)), *LINEAR, *sgd, 'optimizer.args={"lr": 1.0}', *extra),
                    "checkpoint-epoch1.pth")
        return torch.sqrt(sum(((w[k] - init[k]) ** 2).sum() for k in w)).item()

    free = update_norm()
    clipped = update_norm("trainer.clip_grad_norm=0.01")
    assert free > 0.05
    assert clipped == pytest.approx(0.01, rel=1e-4)


def build_trainer(tmp_path, *overrides):
    """A Trainer on config.json's data as train.py builds it (single process, CPU)."""
    from base.base_data_loader import make_datasets
    from trainer import Trainer

    config = parse_config(f"trainer.save_dir={tmp_path}", *overrides)
    sets = make_datasets(config)
    batch_size = config["data_loader"]["batch_size"]
    loader = BaseDataLoader(sets["train"], batch_size, shuffle=True, seed=config["seed"])
    valid = BaseDataLoader(sets["valid"], batch_size, even_shards=False, seed=config["seed"])
    model = config.init_obj("arch")
    if config["trainer"]["compile"]:
        model = torch.compile(model, backend=config["trainer"]["compile"])
    optimizer = config.init_obj("optimizer", model.parameters())
    metrics = {name: metric_object(config.init_ftn(f"metrics.{i}")) for i, name in enumerate(config.metric_names)}
    return Trainer(model, config.init_ftn("loss"), metrics, optimizer, config, torch.device("cpu"), loader, valid)


def test_bf16_autocast_runs_the_forward_in_bfloat16(tmp_path):
    trainer = build_trainer(tmp_path, "trainer.amp=bf16", "trainer.verbosity=0")
    seen = []
    trainer.model.fc2.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    from train import dry_run
    dry_run(trainer, batches=2)
    assert seen == [torch.bfloat16] * 4  # 2 training + 2 validation batches
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32
    assert not trainer.scaler.is_enabled()  # bf16 needs no loss scaling


def test_bf16_training_learns_and_checkpoints_the_scaler_state(tmp_path):
    run = train(tmp_path / "s", "trainer.amp=bf16", "trainer.epochs=2", "trainer.tensorboard=false",
                "trainer.verbosity=0")
    assert float(run.metrics()[-1]["val_accuracy"]) > 0.8
    scaler = run.checkpoint("checkpoint-epoch2.pth")["scaler"]
    assert scaler == {}  # always a dict; bf16 has no loss scale, so the (disabled) scaler's state is empty


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is allowed")
    result = run_train("-c", "config.json", "trainer.amp=fp16", f"trainer.save_dir={tmp_path / 'saved'}")
    assert_user_error(result, "trainer.amp: fp16 needs a CUDA device")
    assert not (tmp_path / "saved").exists()


def test_compiled_model_saves_plain_keys_that_load_uncompiled(tmp_path):
    """trainer.compile wraps the model; its checkpoint still loads into a plain model, strictly.
    (The "eager" backend keeps the test fast; the wrapping is the same for inductor.)"""
    run = train(tmp_path / "s", *LINEAR, "trainer.compile=eager", "trainer.len_epoch=3")
    state = weights(run, "checkpoint-epoch1.pth")
    assert sorted(state) == ["fc.bias", "fc.weight"]
    LinearModel().load_state_dict(state, strict=True)
    assert run.checkpoint("checkpoint-epoch1.pth")["trainer"]["global_step"] == 3


def test_unknown_compile_backend_is_a_config_error(tmp_path):
    result = run_train("-c", "config.json", "trainer.compile=inductr", f"trainer.save_dir={tmp_path / 'saved'}")
    assert_user_error(result, "trainer.compile: unknown backend 'inductr'", "inductor")
