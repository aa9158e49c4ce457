"""predict.py: a checkpoint or an exported model on image files, table files and the test split; what
cannot be read or does not fit is reported in one line and skipped."""
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
from conftest import assert_ok, call_main, main_error, read_csv, run_script


@pytest.fixture(scope="module")
def model(digits_run, tmp_path_factory):
    """A copy of the session's digits checkpoint (tests must not write into that run), and its model."""
    from model.model import DigitsModel
    folder = tmp_path_factory.mktemp("predict")
    shutil.copy(digits_run.model_dir / "model_best.pth", folder)
    eager = DigitsModel()
    eager.load_state_dict(digits_run.checkpoint()["model"])
    return folder / "model_best.pth", eager.eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Digit images as 8-bit grayscale PNGs, rows of a CSV (with a header) and a .npy batch, plus what
    cannot be predicted: a 9x9 image, a corrupt PNG, a text file; and the tensors each good one holds."""
    from PIL import Image

    from data_loader.datasets import DigitsDataset
    folder = tmp_path_factory.mktemp("inputs")
    x = DigitsDataset().tensors[0][:9]
    pixels = (x[:4, 0] * 255).round().to(torch.uint8)
    (folder / "images").mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p.numpy(), "L").save(folder / "images" / f"d{i}.png")
    Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(folder / "images" / "big.png")
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an input")
    (folder / "empty.csv").write_text("")
    torch.save({"x": x[:2]}, folder / "dict.pt")
    (folder / "object.pt").write_bytes(pickle.dumps(Path("an object, not a tensor")))  # never unpickled
    np.savetxt(folder / "rows.csv", x[4:7].reshape(3, 64).numpy(), delimiter=",", header="p" * 64, comments="")
    np.save(folder / "batch.npy", x[7:9].numpy())
    expected = {**{str(folder / "images" / f"d{i}.png"): pixels[i][None].float() / 255 for i in range(4)},
                **{f"{folder / 'rows.csv'}[{i}]": x[4 + i] for i in range(3)},
                **{f"{folder / 'batch.npy'}[{i}]": x[7 + i] for i in range(2)}}
    return folder, expected


def check_rows(rows, model, expected, atol=0.0):
    """Each row is the model's own prediction for the input it names: class, probability, top 5."""
    assert [r["input"] for r in rows] == list(expected)
    with torch.no_grad():
        outputs = model(torch.stack(list(expected.values())))
    # predictions.csv rounds to 6 decimals (5e-7); predict.py runs other batch sizes, whose float32 kernels
    # sum in another order: outputs of size L then differ by a few eps * L, and a probability by as much.
    slack = 16 * torch.finfo(torch.float32).eps * outputs.abs().amax(1).clamp_min(1)
    for row, p, s in zip(rows, outputs.softmax(1), slack):
        assert row["predicted"] == str(int(p.argmax()))
        assert abs(float(row["probability"]) - float(p.max())) <= 5e-7 + float(s) + atol
        assert [k.split(":")[0] for k in row["top_k"].split("; ")] == [str(int(i)) for i in p.topk(5).indices]


def test_the_test_split_is_predicted_as_test_py_scores_it(model, tmp_path):
    from base.base_data_loader import make_datasets
    from conftest import parse_config
    path, eager = model
    call_main(predict.main, ["-r", path, "-o", tmp_path / "p.csv"])
    rows = read_csv(tmp_path / "p.csv")
    test = make_datasets(parse_config())["test"]
    (x, y), indices = test.tensors, test.indices  # rows named by the sample's index in data_loader.dataset
    assert len(rows) == len(y) == 270 and indices != list(range(270))
    check_rows(rows, eager, {f"test[{i}]": x[n] for n, i in enumerate(indices)})
    assert [r["target"] for r in rows] == [str(int(t)) for t in y]


def test_files_folders_and_tables_and_each_bad_input_one_line_skipped(model, inputs, tmp_path):
    path, eager = model
    folder, expected = inputs
    result = run_script("predict.py", "-r", path, folder / "images", folder / "rows.csv", folder / "batch.npy",
                        folder / "notes.txt", folder / "absent.png", folder / "empty.csv", folder / "dict.pt",
                        folder / "object.pt", "-o", tmp_path / "p.csv", "--batch-size", "3")
    assert_ok(result)
    check_rows(read_csv(tmp_path / "p.csv"), eager, expected)
    skipped = result.stderr.strip().splitlines()
    if not torch.cuda.is_available():  # config.json asks for a GPU: a warning first
        assert skipped.pop(0) == "n_gpu is 1 in the config, but no GPU is available: running on the CPU."
    skipped = sorted(skipped)
    assert skipped == sorted([
        f"skipped {folder / 'notes.txt'}: not an image, .csv, .npy or .pt file",
        f"skipped {folder / 'absent.png'}: not found",
        f"skipped {folder / 'empty.csv'}: unreadable: no samples in it",
        f"skipped {folder / 'dict.pt'}: unreadable: holds a dict, not a tensor",
        f"skipped {folder / 'object.pt'}: unreadable: not a tensor file that torch.load(weights_only=True) reads",
        f"skipped {folder / 'images' / 'big.png'}: shape [1, 9, 9], the model takes [1, 8, 8]",
        f"skipped {folder / 'images' / 'broken.png'}: unreadable: cannot identify image file "
        f"'{folder / 'images' / 'broken.png'}'"]), result.stderr
    assert "Predicted 9 input(s)" in result.stdout and "skipped 7" in result.stdout


def test_exported_models_predict_what_the_checkpoint_predicts(model, inputs, tmp_path):
    import export
    path, eager = model
    folder, expected = inputs
    call_main(export.main, ["-r", path])
    for artifact in ("model.ts", "model.pt2", "model.onnx"):
        out = tmp_path / f"{artifact}.csv"
        call_main(predict.main, ["-r", path.with_name(artifact), folder / "images", folder / "rows.csv",
                                 folder / "batch.npy", "-o", out])
        check_rows(read_csv(out), eager, expected, atol=1e-5)
    call_main(predict.main, ["-r", path.with_name("model.onnx"), "-o", tmp_path / "test.csv"])
    assert len(read_csv(tmp_path / "test.csv")) == 270


def test_what_cannot_be_predicted_is_one_line(model, inputs, tmp_path, capsys):
    path, _ = model
    folder, _ = inputs
    lone = tmp_path / "model.onnx"
    shutil.copy(path, lone)  # model.json is read first: the bytes do not matter here
    code, err = main_error(predict.main, ["-r", lone, folder / "rows.csv"], capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'model.json'}: missing, or not one export.py wrote; " \
                                        "run export.py on the checkpoint again"
    code, err = main_error(predict.main, ["-r", path, folder / "notes.txt", "-o", tmp_path / "p.csv"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == "error: no input could be predicted (1 skipped)"
    assert not (tmp_path / "p.csv").exists()


def test_outputs_that_are_not_class_scores_are_written_as_values():
    rows = list(predict.to_rows([("a", torch.tensor([0.5]), torch.tensor([0.25])),
                                 ("b", torch.tensor([2.0, 0.0]), torch.tensor(1))], ["no", "yes"], 5))
    assert rows[0] == {"input": "a", "output": "[0.5]", "target": "[0.25]"}
    assert rows[1]["predicted"] == "no" and rows[1]["target"] == "yes" and rows[1]["top_k"] == "no:0.8808; yes:0.1192"
