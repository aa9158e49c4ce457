"""Random augmentation (RandomResizedCrop, RandomHorizontalFlip) does not break exact resume: each
training sample's randomness is seeded by (seed, epoch, index), in a DataLoader worker or not.

The runs are configs/image_folder.json on a tiny image folder, with torchvision's
mobilenet_v3_small (batch norm and dropout, like the ResNet18 of the config, at an eighth of the
checkpoint size) on 32 px crops, run in this process: a few seconds for all of them."""
import contextlib
import gc
import io
import shutil
import traceback

import pytest
import torch

from conftest import ROOT, Run, call_main, make_image_folder
from conftest import assert_same_run as conftest_same_run

NAME = "ImageFolder_ResNet18"
# 27 training images, batches of 8: 4 steps per epoch (the last of 3 images); a mid-epoch
# checkpoint every 3 steps: checkpoint-epoch1-step3.pth and checkpoint-epoch2-step6.pth.
SMALL = ["arch.type=torchvision.models.mobilenet_v3_small", "arch.args.num_classes=3", "data_loader.batch_size=8", "data_loader.train_transform.0.args.size=32",
         "data_loader.eval_transform.0.args.size=36", "data_loader.eval_transform.1.args.size=32",
         "trainer.tensorboard=false", "trainer.verbosity=1", "trainer.save_period=1", "trainer.save_every_steps=3"]


def run_train(*argv) -> str:
    """train.py's main in this process (the scripts' code path without the interpreter start-up);
    its console output. A failure fails the test only after the failed run's objects are freed:
    DataLoader workers kept alive by a traceback would block the interpreter's exit."""
    import train as train_script
    out, failure = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            call_main(train_script.main, [str(a) for a in argv])
    except BaseException as e:  # noqa: B902 (SystemExit too)
        failure = "".join(traceback.format_exception(e))
    if failure:
        gc.collect()
        pytest.fail(f"train.py {' '.join(map(str, argv))} failed:\n{out.getvalue()}\n{failure}")
    return out.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("aug") / "images")


def config_args(images, save_dir, workers, epochs=2):
    return ["-c", "configs/image_folder.json", "--run-id", "a", f"trainer.save_dir={save_dir}",
            f"data_loader.dataset.args.root={images / 'train'}", f"data_loader.valid_dataset.args.root={images / 'val'}",
            f"data_loader.test_dataset.args.root={images / 'test'}", *SMALL, f"trainer.epochs={epochs}",
            f"data_loader.num_workers={workers}"]


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """The uninterrupted 2-epoch run (no workers)."""
    save_dir = tmp_path_factory.mktemp("straight") / "saved"
    out = run_train(*config_args(images, save_dir, workers=0))
    assert "Data: 27 training, 6 validation samples" in out
    run = Run(save_dir, "a", name=NAME)
    assert {"checkpoint-epoch1-step3.pth", "checkpoint-epoch2-step6.pth", "checkpoint-epoch2.pth"} <= run.pth_files()
    return run


def assert_same_run(a: Run, b: Run, *checkpoints):
    conftest_same_run(a, b, *checkpoints)
    assert [r["epoch"] for r in b.metrics()] == ["1", "2"]


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_after_one_epoch_then_resume_is_bitwise(images, straight, tmp_path, workers):
    save_dir = tmp_path / "saved"
    run_train(*config_args(images, save_dir, workers, epochs=1))
    resumed = Run(save_dir, "a", name=NAME)
    run_train("-r", resumed.model_dir / "checkpoint-epoch1.pth", "trainer.epochs=2")
    assert_same_run(straight, resumed, "checkpoint-epoch2-step6.pth", "checkpoint-epoch2.pth")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("checkpoint", ["checkpoint-epoch1-step3.pth", "checkpoint-epoch2-step6.pth"])
def test_resume_mid_epoch_is_bitwise(straight, tmp_path, workers, checkpoint):
    """The straight run (saved with no workers) resumed mid-epoch, with 0 or 2 workers."""
    resumed = Run(tmp_path / "saved", "a", name=NAME)
    shutil.copytree(straight.save_dir, resumed.save_dir)
    assert resumed.checkpoint(checkpoint)["trainer"]["batches_done"] in (2, 3)  # really mid-epoch
    run_train("-r", resumed.model_dir / checkpoint, f"data_loader.num_workers={workers}")
    assert list(resumed.model_dir.glob("superseded/*/checkpoint-epoch2.pth"))  # it was rewritten
    assert_same_run(straight, resumed, "checkpoint-epoch2-step6.pth", "checkpoint-epoch2.pth")


# ---- what makes it exact ------------------------------------------------------------------------

def image_config(images):
    from parse_config import ConfigParser, load_config_file
    from utils.registry import Registry

    overrides = [o for o in config_args(images, "unused", 0) if "=" in o and not o.startswith("trainer.save_dir")]
    return ConfigParser(load_config_file(ROOT / "configs/image_folder.json"), overrides, Registry())


def test_each_epoch_draws_new_crops_and_a_key_always_the_same(images):
    from base.base_data_loader import Transformed, make_datasets

    train = make_datasets(image_config(images))["train"]
    assert isinstance(train, Transformed) and train.seed == 1
    for i in (0, 5, 26):
        first, label = train[(0, i)]
        assert first.shape == (3, 32, 32)
        assert not torch.equal(first, train[(1, i)][0])  # a new crop / flip in each epoch
        assert torch.equal(first, train[(0, i)][0]) and train[(0, i)][1] == label  # the key fixes it
    # the process's own RNG stream is untouched by the sample's randomness
    state = torch.get_rng_state()
    train[(3, 4)]
    assert torch.equal(state, torch.get_rng_state())
    # without the per-sample seed the same sample is cropped differently on every call
    unseeded = Transformed(train.dataset, train.transform)
    assert not torch.equal(unseeded[4][0], unseeded[4][0])


def test_transforming_only_the_input_gives_what_the_whole_sample_gives(images):
    """torchvision transforms pass labels through: the loader transforms only an image's input (faster),
    with the same randomness, so the same crops as the whole (image, label) sample; a user's own
    transform, or a sample with a mask or boxes, still gets the whole sample."""
    from torchvision import tv_tensors

    from base.base_data_loader import Transformed, make_datasets
    train = make_datasets(image_config(images))["train"]
    assert train.input_only
    whole = Transformed(train.dataset, train.transform, seed=1)
    for key in [(0, 0), (0, 5), (2, 26)]:
        (x, y), (x_whole, y_whole) = train[key], whole[key]
        assert torch.equal(x, x_whole) and y == y_whole
    image, label = train.dataset[0]
    mask = tv_tensors.Mask(torch.ones(image.size[1], image.size[0], dtype=torch.uint8))
    joint = Transformed([(image, mask)], train.transform, seed=1, input_only=True)[(0, 0)]
    assert joint[1].shape[-2:] == joint[0].shape[-2:] == (32, 32)  # cropped with the image


def test_worker_and_main_process_draw_the_same_crops(images):
    from base import BaseDataLoader
    from base.base_data_loader import make_datasets

    train = make_datasets(image_config(images))["train"]

    def epoch_batches(workers, start_batch=0):
        """(batches, sample keys) of epoch 1; the loader and its workers are gone on return."""
        loader = BaseDataLoader(train, batch_size=8, shuffle=True, num_workers=workers, seed=1)
        assert loader.sampler.keyed  # it asks the dataset for (epoch, index)
        loader.set_epoch(1, start_batch)
        return list(loader), list(loader.sampler)

    (main, keys), (workers, _) = epoch_batches(0), epoch_batches(2)
    assert len(workers) == 4
    for (x0, y0), (x2, y2), key in zip(main, workers, keys):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
        by_hand = torch.stack([train[k][0] for k in key])  # the main process, sample by sample
        assert torch.equal(x2, by_hand)
    # resuming mid-epoch: the rest of the epoch is the same batches
    rest, _ = epoch_batches(2, start_batch=2)
    assert len(rest) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, main[2:]))
