"""The README is the front door: its config reference lists every key with its real default."""
import json
import re

from conftest import ROOT
from utils.errors import REQUIRED
from utils.schema import LOADER_DEFAULTS, TOP_LEVEL, TRAINER_DEFAULTS

README = (ROOT / "README.md").read_text()


def documented_defaults():
    """{key: default cell} from the README's config tables."""
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+) \|", README, flags=re.M)
    return {key: cell.strip() for key, cell in rows}


def test_every_config_key_is_documented_with_its_default():
    table = documented_defaults()
    expected = {}
    for prefix, schema in (("", TOP_LEVEL), ("data_loader.", LOADER_DEFAULTS), ("trainer.", TRAINER_DEFAULTS)):
        expected.update({prefix + key: "required" if default is REQUIRED else f"`{json.dumps(default)}`"
                         for key, (default, _, _) in schema.items()})
    assert "trainer.type" in expected and "callbacks" in expected and "data_loader.dataset" in expected
    assert {k: table.get(k) for k in expected} == expected
    assert set(table) == set(expected)  # and nothing that does not exist


def test_readme_commands_name_files_that_exist():
    for path in ("config.json", "configs/mnist.json", "configs/fashion_mnist.json", "configs/image_folder.json",
                 "requirements.txt", "train.py", "test.py", "export.py", "new_project.py", ".ci/run", "data/README.md",
                 "tests/test_readme_recipes.py", "trainer/trainer.py", "base/base_trainer.py", "model/metric.py"):
        assert path in README and (ROOT / path).exists(), path
