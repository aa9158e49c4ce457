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


@pytest.mark.parametrize("config, folder", [("configs/mnist.json", "MNIST"),
                                            ("configs/fashion_mnist.json", "FashionMNIST")])
def test_missing_files_offline_name_what_to_put_where(tmp_path, config, folder):
    result = run_train("-c", config, f"data_loader.args.data_dir={tmp_path}", "data_loader.args.download=false",
                       f"trainer.save_dir={tmp_path / 'saved'}")
    assert_user_error(result, f"{folder} not found in {tmp_path / folder / 'raw'}", "train-images-idx3-ubyte.gz",
                      "t10k-labels-idx1-ubyte.gz")
    assert not (tmp_path / "saved").exists()


def test_mnist_config_trains_and_tests_on_files_in_place(tmp_path):
    fake_mnist(tmp_path, "MNIST")
    common = [f"data_loader.args.data_dir={tmp_path}", "data_loader.args.download=false"]
    assert_ok(run_train("-c", "configs/mnist.json", "--run-id", "m", *common, f"trainer.save_dir={tmp_path / 's'}",
                        "trainer.epochs=1", "trainer.tensorboard=false"))
    best = tmp_path / "s" / "models" / "Mnist_LeNet" / "m" / "model_best.pth"
    result = run_script("test.py", "-r", best)
    assert_ok(result)
    assert '"n_samples": 50' in result.stdout  # the t10k file's 50 images
