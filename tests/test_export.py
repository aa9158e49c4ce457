"""export.py: each format written beside the checkpoint, loaded back and verified against the eager model."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, run_script, train
from export import FORMATS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("export") / "saved", "trainer.epochs=1", "trainer.verbosity=0",
                 "trainer.tensorboard=false")


def test_every_format_is_written_verified_and_loads_in_plain_python(run, tmp_path):
    result = run_script("export.py", "-r", run.model_dir / "model_best.pth")
    assert_ok(result)
    # each artifact is one self-contained file (no model.onnx.data beside it), and no temp file is left
    assert {p.name for p in run.model_dir.iterdir()} == {".lock", "config.json", "checkpoint-epoch1.pth",
                                                         "model_best.pth", "model.json", *FORMATS.values()}
    sidecar = json.loads((run.model_dir / "model.json").read_text())
    assert sidecar["input"] == {"shape": [None, 1, 8, 8], "dtype": "torch.float32"}
    assert sidecar["run_id"] == "run" and sidecar["checkpoint"] == "model_best.pth"
    assert set(sidecar["formats"]) == {"torchscript", "exported", "onnx"}
    assert all(f["verified"] and f["max_abs_diff"] <= 1e-4 for f in sidecar["formats"].values())
    assert result.stdout.count("within the tolerance") == 3

    # what a consumer does: load each artifact without the template, on a batch of another size
    x = torch.rand(5, 1, 8, 8)
    from model.model import DigitsModel
    eager = DigitsModel()
    eager.load_state_dict(run.checkpoint()["model"])
    expected = eager.eval()(x)
    outputs = [torch.jit.load(str(run.model_dir / "model.ts"))(x),
               torch.export.load(str(run.model_dir / "model.pt2")).module()(x)]
    import onnxruntime
    shutil.copy(run.model_dir / "model.onnx", tmp_path)  # alone, as a server would receive it
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs.append(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]))
    for out in outputs:
        assert out.shape == (5, 10) and torch.allclose(out, expected, atol=1e-4)


def test_a_model_a_format_cannot_export_is_one_line_and_the_others_still_go_through(run, tmp_path):
    model_file = ROOT / "model" / "branchy_for_test.py"  # a model with data-dependent control flow
    model_file.write_text(
        "import torch.nn as nn\n\n\nclass Branchy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(64, 10)\n\n"
        "    def forward(self, x):\n        out = self.fc(x.flatten(1))\n"
        "        return out if x.sum() > 0 else -out\n")
    try:
        assert_ok(run_script("train.py", "-c", "config.json", "--run-id", "b", f"trainer.save_dir={tmp_path}",
                             "arch.type=Branchy", "arch.args={}", "trainer.epochs=1", "trainer.verbosity=0",
                             "trainer.tensorboard=false"))
        checkpoint = tmp_path / "models" / "Digits_CNN" / "b" / "model_best.pth"
        result = run_script("export.py", "-r", checkpoint, "--format", "torchscript", "exported")
    finally:
        model_file.unlink()
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    # tracing would silently record one branch; torch.export refuses the data-dependent branch: each format
    # gets its line, and a failure does not stop the next format from being tried
    assert [line.split(":")[0] for line in lines] == ["torchscript", "exported"], result.stdout
    assert lines[0].startswith("torchscript: cannot export Branchy: ") and "boolean" in lines[0]
    assert lines[1].startswith("exported: cannot export Branchy: ")
    assert result.stderr.strip() == "error: not exported or not verified: torchscript, exported"
    assert json.loads(checkpoint.with_name("model.json").read_text())["formats"] == {}
    assert "Traceback" not in result.stdout + result.stderr


def test_the_readme_snippet_loads_the_exports_in_plain_python(run):
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("Loading them in a plain Python script")[1].split("```python\n")[1].split("```")[0]
    assert "onnxruntime.InferenceSession" in snippet and "torch.export.load" in snippet
    if not (run.model_dir / "model.onnx").exists():
        assert_ok(run_script("export.py", "-r", run.model_dir / "model_best.pth"))
    script = run.model_dir / "snippet.py"
    script.write_text(snippet + "\nassert scores.shape == (4, 10), scores.shape\nprint('ok')\n")
    result = subprocess.run([sys.executable, str(script)], cwd=run.model_dir, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
