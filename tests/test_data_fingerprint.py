"""A checkpoint records which samples each split holds; resume and test.py refuse data that changed under a run
(an image added to or removed from a folder reshuffles the seeded splits), fine-tuning takes new data."""
import hashlib
import shutil

import pytest
import torch

from conftest import call_main, main_error, make_image_folder, parse_config

SMALL = ["arch.type=torchvision.models.mobilenet_v3_small", "arch.args.num_classes=3", "data_loader.batch_size=8",
         "data_loader.train_transform.0.args.size=32", "data_loader.eval_transform.0.args.size=36",
         "data_loader.eval_transform.1.args.size=32", "data_loader.num_workers=0", "trainer.epochs=1",
         "trainer.tensorboard=false", "trainer.verbosity=1"]


def split_config(root, save_dir):
    """configs/image_folder.json on one folder cut into seeded train / validation / test splits."""
    return ["-c", "configs/image_folder.json", f"trainer.save_dir={save_dir}", f"data_loader.dataset.args.root={root}",
            "data_loader.valid_dataset=null", "data_loader.test_dataset=null", "data_loader.validation_split=0.2",
            "data_loader.test_split=0.2", *SMALL]


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(tmp_path):
    """A 1-epoch run on 30 images in one folder (18 train, 6 validation, 6 test): (folder, saved/, run dir)."""
    import train
    root = make_image_folder(tmp_path / "images", counts=(("all", 10),)) / "all"
    call_main(train.main, [*split_config(root, tmp_path / "saved"), "--run-id", "r"])
    return root, tmp_path / "saved", tmp_path / "saved/models/ImageFolder_ResNet18/r"


def test_the_checkpoint_records_each_split_the_input_and_the_class_names(trained):
    data = torch.load(trained[2] / "checkpoint-epoch1.pth", weights_only=True)["data"]
    assert [data["splits"][k].split(",")[0] for k in ("train", "valid", "test")] == ["18 samples", "6 samples",
                                                                                     "6 samples"]
    assert len(set(data["splits"].values())) == 3  # three different sets of samples
    assert data["input"] == {"shape": [None, 3, 32, 32], "dtype": "torch.float32"}
    assert data["class_names"] == ["class0", "class1", "class2"]


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_resume_and_test_py_refuse_changed_data_and_change_nothing(trained, capsys, change):
    import predict
    import test as test_script
    import train
    root, saved, run = trained
    image = root / "class1" / "3.png"
    if change == "added":
        shutil.copy(image, root / "class2" / "new.png")
    elif change == "removed":
        image.unlink()
    else:
        image.rename(root / "class1" / "99.png")  # sorts last in its class: the samples after it move
    before = digest(saved)
    status, err = main_error(train.main, ["-r", run / "checkpoint-epoch1.pth", "trainer.epochs=2"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "the train split is not the data of" in err and "then: 18 samples" in err, err
    status, err = main_error(test_script.main, ["-r", run / "checkpoint-epoch1.pth"], capsys)
    assert status == 2 and "the test split is not the data of" in err and "then: 6 samples" in err, err
    status, err = main_error(predict.main, ["-r", run / "checkpoint-epoch1.pth"], capsys)  # its accuracy line too
    assert status == 2 and "the test split is not the data of" in err and "then: 6 samples" in err, err
    assert digest(saved) == before  # nothing written, nothing moved
    # fine-tuning on the new data is a new run, and allowed (one batch an epoch: BatchNorm needs 2 samples)
    call_main(train.main, [*split_config(root, saved), "-r", run / "checkpoint-epoch1.pth", "--run-id", "tuned",
                           "data_loader.batch_size=32"])
    assert (saved / "models/ImageFolder_ResNet18/tuned/checkpoint-epoch1.pth").is_file()


def test_unchanged_data_resumes_and_tests(trained):
    import predict
    import test as test_script
    import train
    run = trained[2]
    call_main(train.main, ["-r", run / "checkpoint-epoch1.pth", "trainer.epochs=2"])
    assert (run / "checkpoint-epoch2.pth").is_file()
    assert call_main(test_script.main, ["-r", run / "checkpoint-epoch2.pth"])["n_samples"] == 6
    call_main(predict.main, ["-r", run / "checkpoint-epoch2.pth"])
    assert len((run / "predictions.csv").read_text().splitlines()) == 1 + 6


def test_a_tensor_dataset_split_is_told_by_its_indices():
    from base.base_data_loader import fingerprint, make_datasets
    sets, again = make_datasets(parse_config()), make_datasets(parse_config())
    other = make_datasets(parse_config("seed=2"))
    assert all(fingerprint(sets[k]) == fingerprint(again[k]) for k in sets)
    assert sets["test"].indices != other["test"].indices
    assert fingerprint(sets["test"]) != fingerprint(other["test"])
    assert fingerprint(sets["test"]).startswith(f"{len(sets['test'])} samples, ")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_one_line_naming_it(tmp_path, workers):
    from conftest import run_train
    root = make_image_folder(tmp_path / "images", counts=(("all", 10),)) / "all"
    (root / "class0" / "4.png").write_bytes(b"not a png")
    result = run_train(*split_config(root, tmp_path / "saved"), f"data_loader.num_workers={workers}",
                       "data_loader.validation_split=0.0", "data_loader.test_split=0.0", "trainer.monitor=off")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert err[-1].startswith("error: data: ") and "cannot identify image file" in err[-1], err
    assert str(root / "class0" / "4.png") in err[-1] and "Original Traceback" not in err[-1], err
