"""Config values that used to fail mid-run or with a traceback: each is now one line naming the key, exit 2 (or 1
for a run that fails mid-way), and nothing written."""
import pytest
import torch

from conftest import main_error, make_image_folder, parse_config, run_train

LINEAR = ["arch.type=torch.nn.Linear"]
CASES = {  # name: (overrides, what the one line names)
    "linear_huge": ([*LINEAR, 'arch.args={"in_features": 10000000000, "out_features": 10000000000}'],
                    "arch: torch.nn.Linear failed: "),
    "linear_negative": ([*LINEAR, 'arch.args={"in_features": -3, "out_features": 10}'], "negative dimension -3"),
    "meta_device": ([*LINEAR, 'arch.args={"in_features": 8, "out_features": 10, "device": "meta"}'],
                    "arch: torch.nn.Linear made tensors on the meta device"),
    "int_4400_digits": (["seed=" + "9" * 4400], "override 'seed': Exceeds the limit (4300 digits)"),
    "lambda_string": (['data_loader.train_transform=[{"type": "torchvision.transforms.v2.Lambda", '
                       '"args": {"lambd": "os.system"}}]'],
                      "data_loader.train_transform[0].args.lambd: torchvision.transforms.v2.Lambda expects a function"),
    "loader_string": (['data_loader.dataset={"type": "torchvision.datasets.ImageFolder", '
                       '"args": {"root": "IMAGES", "loader": "os.system"}}'],
                      "data_loader.dataset.args.loader: torchvision.datasets.ImageFolder expects a function"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    import train as train_script
    overrides, fragment = CASES[case]
    overrides = [o.replace("IMAGES", str(tmp_path / "images")) for o in overrides]
    status, err = main_error(train_script.main, ["-c", "config.json", f"trainer.save_dir={tmp_path / 'saved'}",
                                                 *overrides], capsys)
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "saved").exists()


def test_an_integer_of_4400_digits_in_a_file_is_one_line(tmp_path, capsys):
    import train as train_script
    (tmp_path / "c.json").write_text('{"seed": ' + "9" * 4400 + "}")
    status, err = main_error(train_script.main, ["-c", tmp_path / "c.json"], capsys)
    assert status == 2 and err.strip() == f"error: {tmp_path / 'c.json'}: Exceeds the limit (4300 digits) for " \
                                          "integer string conversion: value has 4400 digits", err


def test_dtype_strings_inside_a_dict_argument_become_dtypes():
    config = parse_config('data_loader.train_transform=[{"type": "torchvision.transforms.v2.ToDtype", '
                          '"args": {"dtype": {"others": "torch.float64"}, "scale": false}}]')
    transform = config.init_obj("data_loader.train_transform.0")
    assert transform.dtype == {"others": torch.float64}
    assert transform(torch.zeros(2, dtype=torch.uint8)).dtype == torch.float64


@pytest.mark.parametrize("dry_run", [True, False])
def test_labels_beyond_the_model_outputs_are_one_line_with_the_traceback_in_info_log(tmp_path, dry_run):
    """num_classes=3 on the 10 digit classes: CrossEntropy's IndexError, named with its likely cause."""
    save_dir = tmp_path / "saved"
    result = run_train("-c", "config.json", "--run-id", "r", *["--dry-run"] * dry_run, "arch.args.num_classes=3",
                       "n_gpu=0",  # CUDA reports it as a device-side assert, not this IndexError
                       f"trainer.save_dir={save_dir}", "trainer.tensorboard=false")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: Target ") and "is out of bounds" in line and "arch.args.num_classes" in line, line
    if dry_run:
        assert not save_dir.exists()
    else:
        assert "IndexError: Target " in (save_dir / "log" / "Digits_CNN" / "r" / "info.log").read_text()
        assert not list(save_dir.rglob("*.pth"))


@pytest.mark.parametrize("num_classes", [10, 3])
def test_a_model_sized_for_other_classes_than_the_data_has_gets_a_warning(tmp_path, num_classes):
    images = make_image_folder(tmp_path / "images", counts=(("train", 4),))  # 3 class folders
    result = run_train("-c", "configs/image_folder.json", "--dry-run",
                       "arch.type=torchvision.models.mobilenet_v3_small", f"arch.args.num_classes={num_classes}", f"data_loader.dataset.args.root={images / 'train'}",
                       "data_loader.valid_dataset=null", "data_loader.test_dataset=null", "data_loader.batch_size=4",
                       "data_loader.num_workers=0", "trainer.monitor=off", f"trainer.save_dir={tmp_path / 'saved'}",
                       "n_gpu=0")
    assert result.returncode == 0, result.stderr
    warned = "arch.args.num_classes is 10, but the data has 3 classes" in result.stdout + result.stderr
    assert warned == (num_classes == 10), result.stdout + result.stderr


def test_an_argument_that_takes_a_function_or_a_name_still_takes_the_name():
    config = parse_config("arch.type=torch.nn.TransformerEncoderLayer",  # activation: str | Callable
                          'arch.args={"d_model": 8, "nhead": 2, "activation": "gelu"}')
    assert config.init_obj("arch").activation is torch.nn.functional.gelu
