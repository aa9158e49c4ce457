"""The torchvision datasets behind configs/mnist.json and configs/fashion_mnist.json, offline."""
import struct

import numpy as np
import pytest

from conftest import assert_ok, assert_user_error, run_script, run_train


def write_idx(path, array):
    """An IDX file as MNIST ships it: magic (dtype ubyte, ndim), big-endian sizes, then the bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root, folder, n_train=200, n_test=50):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))


def offline(root):
    """Overrides that point both datasets of an MNIST-style config at `root`, without downloading."""
    return [f"data_loader.dataset.args.root={root}", f"data_loader.test_dataset.args.root={root}",
            "data_loader.dataset.args.download=false", "data_loader.test_dataset.args.download=false"]


@pytest.mark.parametrize("config, folder", [("configs/mnist.json", "MNIST"),
                                            ("configs/fashion_mnist.json", "FashionMNIST")])
def test_missing_files_offline_name_what_to_put_where(tmp_path, config, folder):
    result = run_train("-c", config, *offline(tmp_path), f"trainer.save_dir={tmp_path / 'saved'}")
    line = assert_user_error(result, f"torchvision.datasets.{folder}", str(tmp_path / folder / "raw"),
                             *(f"{prefix}-{kind}-idx{dim}-ubyte" for prefix in ("train", "t10k")
                               for kind, dim in (("images", 3), ("labels", 1))))
    assert "-ubyte.gz" not in line  # the names to put there are the uncompressed ones, which torchvision reads
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("config, folder, name", [("configs/mnist.json", "MNIST", "Mnist_LeNet"),
                                                  ("configs/fashion_mnist.json", "FashionMNIST", "FashionMnist_LeNet")])
def test_config_trains_and_tests_on_uncompressed_files_in_place(tmp_path, config, folder, name):
    fake_mnist(tmp_path, folder)
    assert_ok(run_train("-c", config, "--run-id", "m", *offline(tmp_path), f"trainer.save_dir={tmp_path / 's'}",
                        "trainer.epochs=1", "trainer.tensorboard=false"))
    best = tmp_path / "s" / "models" / name / "m" / "model_best.pth"
    result = run_script("test.py", "-r", best)
    assert_ok(result)
    assert '"n_samples": 50' in result.stdout  # the t10k file's 50 images
