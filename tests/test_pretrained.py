"""arch.args.weights for a torchvision model: the hub's weights file loads with weights_only=True (a planted
pickle runs nothing), and offline the one error line names the file to place and where, creating no directory."""
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from conftest import THREADS_ENV, assert_user_error, parse_config, run_train

ARCH = ["arch.type=torchvision.models.squeezenet1_1", 'arch.args={"weights": "IMAGENET1K_V1"}']


def hub_file(torch_home) -> Path:
    from torchvision.models import SqueezeNet1_1_Weights
    return Path(torch_home) / "hub" / "checkpoints" / Path(urlparse(SqueezeNet1_1_Weights.IMAGENET1K_V1.url).path).name


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling it creates the marker file
        return open, (self.marker, "w")


def test_a_weights_file_placed_by_hand_is_what_the_model_starts_from(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import squeezenet1_1
    torch.manual_seed(3)
    made = squeezenet1_1().state_dict()  # a locally made file, under the name torchvision looks for
    hub_file(tmp_path).parent.mkdir(parents=True)
    torch.save(made, hub_file(tmp_path))
    model = parse_config(*ARCH).init_obj("arch")
    for key, value in model.state_dict().items():
        assert torch.equal(value, made[key]), key


def test_a_planted_weights_file_runs_no_code_and_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "payload-ran"
    hub_file(tmp_path).parent.mkdir(parents=True)
    torch.save({"features.0.weight": Payload(str(marker))}, hub_file(tmp_path))
    from utils.errors import DataError
    with pytest.raises(DataError, match="refused: not a weights file that loads without running code") as e:
        parse_config(*ARCH).init_obj("arch")
    assert str(hub_file(tmp_path)) in str(e.value) and not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # set only while the file loads


def test_a_user_setting_of_the_opposite_variable_is_set_aside_while_loading_and_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch refuses both set at once
    from torchvision.models import squeezenet1_1
    hub_file(tmp_path).parent.mkdir(parents=True)
    torch.save(squeezenet1_1().state_dict(), hub_file(tmp_path))
    parse_config(*ARCH).init_obj("arch")
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_offline_the_line_names_the_file_to_place_and_no_directory_is_left(tmp_path):
    home = tmp_path / "torch"  # does not exist: torch.hub would create it and hub/checkpoints
    proxy = "http://127.0.0.1:9"  # a closed port: offline on any machine
    env = dict(THREADS_ENV, TORCH_HOME=str(home), https_proxy=proxy, HTTPS_PROXY=proxy, no_proxy="", NO_PROXY="")
    result = run_train("-c", "config.json", "--dry-run", f"trainer.save_dir={tmp_path / 'saved'}", *ARCH, env=env)
    assert_user_error(result, "arch.args.weights: cannot download https://", f"place that file at {hub_file(home)}")
    assert not home.exists() and not (tmp_path / "saved").exists()
