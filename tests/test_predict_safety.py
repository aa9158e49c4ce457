"""What predict.py and export.py read and write can be trusted: predict never replaces a file it did not write,
an input that cannot be predicted is skipped in one line (without hanging or filling the memory), an export is
one set that predict checks before it runs any of it, and no file loaded runs code."""
import hashlib
import json
import os
import shutil
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

import export
import predict
from conftest import assert_ok, call_main, main_error, read_csv, run_script


@pytest.fixture(scope="module")
def run(digits_run, tmp_path_factory):
    """A copy of the session's digits run directory (its checkpoints and config.json), exported in every format."""
    folder = tmp_path_factory.mktemp("trust") / "run"
    shutil.copytree(digits_run.model_dir, folder)
    call_main(export.main, ["-r", folder / "model_best.pth"])
    return folder


@pytest.fixture
def rows(tmp_path):
    from data_loader.datasets import DigitsDataset
    x = DigitsDataset().tensors[0][:3].reshape(3, 64).numpy()
    np.savetxt(tmp_path / "rows.csv", x, delimiter=",")
    return tmp_path / "rows.csv"


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(capsys, argv, *fragments):
    code, err = main_error(predict.main, argv, capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("n_gpu is")]  # config.json asks for one
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(f in err for f in fragments), err
    return err


def test_predict_never_replaces_a_file_it_did_not_write(run, rows, tmp_path, capsys):
    model = run / "model_best.pth"
    kept = {p: sha(p) for p in (model, run / "config.json", rows, run / "model.json")}
    for target in kept:
        one_line(capsys, ["-r", model, rows, "-o", target], f"-o {target}: exists and is not an earlier predictions CSV")
    one_line(capsys, ["-r", model, rows, "-o", tmp_path], "not a file in an existing folder")
    one_line(capsys, ["-r", model, rows, "-o", tmp_path / "missing" / "p.csv"], "not a file in an existing folder")
    assert {p: sha(p) for p in kept} == kept
    call_main(predict.main, ["-r", model, rows, "-o", tmp_path / "p.csv"])
    call_main(predict.main, ["-r", model, rows, "-o", tmp_path / "p.csv"])  # its own earlier output: replaced
    assert len(read_csv(tmp_path / "p.csv")) == 3
    # an earlier predictions CSV named as an input too is not replaced
    one_line(capsys, ["-r", model, tmp_path / "p.csv", "-o", tmp_path / "p.csv"], "exists and is not")


def png_header(width, height):
    """A PNG whose header claims width x height pixels, with no image data: only decoding would find out."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_inputs_that_cannot_be_predicted_are_skipped_without_hanging(run, rows, tmp_path):
    from data_loader.inputs import MAX_PIXELS
    os.mkfifo(tmp_path / "fifo.csv")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    (tmp_path / "huge.png").write_bytes(png_header(13000, 13000))
    torch.save(torch.zeros(64).expand(10**6, 64), tmp_path / "stride0.pt")  # 256 bytes of storage
    torch.save(torch.empty(2, 64, device="meta"), tmp_path / "meta.pt")
    np.save(tmp_path / "nan.npy", np.array([[np.nan] * 64, [np.inf] * 64, [0.5] * 64], np.float32))
    (tmp_path / "gap.csv").write_text(",".join(["1"] * 63) + ",\n" + ",".join(["1"] * 64) + "\n")
    names = ["fifo.csv", "fifo.png", "zero.npy", "huge.png", "stride0.pt", "meta.pt", "nan.npy", "gap.csv"]
    result = run_script("predict.py", "-r", run / "model_best.pth", rows, *[tmp_path / n for n in names],
                        "-o", tmp_path / "p.csv", timeout=120)
    assert_ok(result)
    skipped = {line.split(": ")[0].removeprefix("skipped "): line.split(": ", 1)[1]
               for line in result.stderr.splitlines() if line.startswith("skipped ")}
    assert skipped == {
        str(tmp_path / "fifo.csv"): "not a regular file", str(tmp_path / "fifo.png"): "not a regular file",
        str(tmp_path / "zero.npy"): "not a regular file",
        str(tmp_path / "huge.png"): f"13000x13000 pixels, more than {MAX_PIXELS} (MAX_PIXELS)",
        str(tmp_path / "stride0.pt"): "unreadable: its storage holds fewer values than its shape claims",
        str(tmp_path / "meta.pt"): "unreadable: its storage holds fewer values than its shape claims",
        f"{tmp_path / 'nan.npy'}[0]": "holds NaN or infinite values",
        f"{tmp_path / 'nan.npy'}[1]": "holds NaN or infinite values",
        str(tmp_path / "gap.csv"): skipped.get(str(tmp_path / "gap.csv"), "missing"),
    }, result.stderr
    assert skipped[str(tmp_path / "gap.csv")].startswith("unreadable"), result.stderr  # not a header: the file
    predicted = [r["input"] for r in read_csv(tmp_path / "p.csv")]
    assert predicted == [f"{rows}[{i}]" for i in range(3)] + [f"{tmp_path / 'nan.npy'}[2]"]


def test_a_csv_header_is_a_first_line_with_a_name(run, rows, tmp_path):
    lines = rows.read_text().splitlines()
    (tmp_path / "named.csv").write_text("\n".join(["a" + ",b" * 63, *lines]) + "\n")
    (tmp_path / "numbers.csv").write_text("\n".join([",".join(map(str, range(64))), *lines]) + "\n")
    call_main(predict.main, ["-r", run / "model_best.pth", tmp_path / "named.csv", tmp_path / "numbers.csv",
                             "-o", tmp_path / "p.csv"])
    predicted = [r["input"] for r in read_csv(tmp_path / "p.csv")]
    assert predicted == [f"{tmp_path / 'named.csv'}[{i}]" for i in range(3)] + \
        [f"{tmp_path / 'numbers.csv'}[{i}]" for i in range(4)]  # a numeric first line is a sample


def test_an_export_is_one_set_that_predict_checks(run, rows, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    info = json.loads((folder / "model.json").read_text())
    assert {f: (e["file"], e["verified"], e["sha256"] == sha(folder / e["file"])) for f, e in info["formats"].items()} \
        == {"torchscript": ("model.ts", True, True), "exported": ("model.pt2", True, True),
            "onnx": ("model.onnx", True, True)}
    # another checkpoint, one format: the earlier formats' files go, model.json names this checkpoint only
    call_main(export.main, ["-r", folder / "checkpoint-epoch3.pth", "--format", "onnx"])
    info = json.loads((folder / "model.json").read_text())
    assert info["checkpoint"] == "checkpoint-epoch3.pth" and list(info["formats"]) == ["onnx"]
    assert not (folder / "model.ts").exists() and not (folder / "model.pt2").exists()
    one_line(capsys, ["-r", folder / "model.ts", rows], "model.ts: no such file")
    # a file model.json does not vouch for: another export's, or changed since
    shutil.copy(run / "model.ts", folder / "model.ts")
    one_line(capsys, ["-r", folder / "model.ts", rows], "not the file model.json vouches for")
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    one_line(capsys, ["-r", folder / "model.onnx", rows], "not the file model.json vouches for")


def test_an_export_stopped_before_model_json_leaves_the_old_set_predictable(run, rows, tmp_path, capsys, monkeypatch):
    """The process dies after the new files moved into place, before model.json is replaced (the last step but the
    clean-up): what predict still runs is the old set's, what it refuses is the new set's moved files."""
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    call_main(predict.main, ["-r", folder / "model.ts", rows, "-o", tmp_path / "before.csv"])
    other = torch.load(folder / "checkpoint-epoch3.pth", weights_only=True)  # other weights: other files
    other["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["model"].items()}
    torch.save(other, folder / "checkpoint-other.pth")

    def killed(*args):
        raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
    monkeypatch.setattr(export, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        call_main(export.main, ["-r", folder / "checkpoint-other.pth", "--format", "onnx"])
    assert json.loads((folder / "model.json").read_text())["checkpoint"] == "model_best.pth"  # the old set's
    call_main(predict.main, ["-r", folder / "model.ts", rows, "-o", tmp_path / "after.csv"])
    assert read_csv(tmp_path / "after.csv") == read_csv(tmp_path / "before.csv")
    one_line(capsys, ["-r", folder / "model.onnx", rows], "not the file model.json vouches for")


def test_an_unverified_artifact_is_refused(run, rows, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    code = call_main(export.main, ["-r", folder / "model_best.pth", "--format", "onnx", "--tolerance", "0"])
    entry = json.loads((folder / "model.json").read_text())["formats"]["onnx"]
    if entry["max_abs_diff"] > 0:  # ONNX Runtime's kernels round otherwise than torch's
        assert code == 1 and entry["verified"] is False
        one_line(capsys, ["-r", folder / "model.onnx", rows], "failed export.py's check")
    else:
        assert code == 0 and entry["verified"] is True
        call_main(predict.main, ["-r", folder / "model.onnx", rows, "-o", tmp_path / "p.csv"])


class Payload:
    """Unpickling it creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pt2_whose_pickles_would_run_code_is_refused(run, rows, tmp_path, capsys):
    folder, marker = tmp_path / "run", tmp_path / "code_ran"
    shutil.copytree(run, folder)
    with zipfile.ZipFile(run / "model.pt2") as original, zipfile.ZipFile(folder / "model.pt2", "w") as forged:
        for item in original.infolist():
            data = original.read(item)
            if "sample_inputs" in item.filename:  # torch.export.load retries these with weights_only=False
                buffer = __import__("io").BytesIO()
                torch.save(Payload(marker), buffer)
                data = buffer.getvalue()
            forged.writestr(item, data)
    info = json.loads((folder / "model.json").read_text())  # an attacker sends a model.json that vouches for it
    info["formats"]["exported"]["sha256"] = sha(folder / "model.pt2")
    (folder / "model.json").write_text(json.dumps(info))
    one_line(capsys, ["-r", folder / "model.pt2", rows], "model.pt2: refused: it could run code")
    assert not marker.exists()
