"""The torchvision datasets behind configs/mnist.json and configs/fashion_mnist.json, offline."""
import struct

import numpy as np
import pytest
import torch

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


def test_mnist_config_trains_and_tests_on_uncompressed_files_in_place(tmp_path):
    fake_mnist(tmp_path, "MNIST")
    assert_ok(run_train("-c", "configs/mnist.json", "--run-id", "m", *offline(tmp_path),
                        f"trainer.save_dir={tmp_path / 's'}", "trainer.epochs=1", "trainer.tensorboard=false"))
    best = tmp_path / "s" / "models" / "Mnist_LeNet" / "m" / "model_best.pth"
    result = run_script("test.py", "-r", best)
    assert_ok(result)
    assert '"n_samples": 50' in result.stdout  # the t10k file's 50 images


@pytest.mark.parametrize("config, folder, mean, std", [("configs/mnist.json", "MNIST", 0.1307, 0.3081),
                                                       ("configs/fashion_mnist.json", "FashionMNIST", 0.286, 0.353)])
def test_config_datasets_are_split_and_normalised_with_their_own_statistics(tmp_path, config, folder, mean, std):
    """In-process (no training): the files in place become the config's datasets: validation_split of
    the training file, the t10k file for testing, each image a float 1x28x28 tensor normalised with
    the config's mean and std (Fashion-MNIST has its own)."""
    from base.base_data_loader import make_datasets
    from conftest import parse_config

    fake_mnist(tmp_path, folder)
    sets = make_datasets(parse_config(*offline(tmp_path), config=config))
    assert (len(sets["train"]), len(sets["valid"]), len(sets["test"])) == (180, 20, 50)
    def expected(prefix, i):
        raw = np.frombuffer((tmp_path / folder / "raw" / f"{prefix}-images-idx3-ubyte").read_bytes()[16:], np.uint8)
        labels = np.frombuffer((tmp_path / folder / "raw" / f"{prefix}-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
        image = torch.from_numpy(raw[i * 784:(i + 1) * 784].astype(np.float32)).view(1, 28, 28)
        return (image / 255 - mean) / std, int(labels[i])

    # eval_transform on the test file, train_transform on the training split (samples keyed by (epoch, index))
    first_train = sets["train"].dataset.indices[0]
    for (image, label), (want, want_label) in ((sets["test"][3], expected("t10k", 3)),
                                               (sets["train"][(0, 0)], expected("train", first_train))):
        assert image.dtype == torch.float32 and image.shape == (1, 28, 28) and label == want_label
        torch.testing.assert_close(image, want, rtol=0, atol=1e-5)
