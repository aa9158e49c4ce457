"""Config parsing: defaults, JSON/YAML, precedence, overrides, and one-line rejection of bad configs."""
import copy
import json

import pytest
import torch
import yaml

import train as train_script
from conftest import ROOT, assert_user_error, call_main, main_error, run_train
from parse_config import ConfigParser, load_config_file
from utils.errors import ConfigError
from utils.registry import Registry

BASE = json.loads((ROOT / "config.json").read_text())
MINIMAL = {
    "name": "m",
    "arch": {"type": "DigitsModel"},
    "data_loader": {"dataset": {"type": "DigitsDataset", "args": {"root": "data/"}}},
    "optimizer": {"type": "SGD", "args": {"lr": 0.1}},
    "loss": "nll_loss",
}
REGISTRY = Registry()  # building one imports the project's packages: once per module


def parser(raw=None, *overrides, **kwargs):
    return ConfigParser(copy.deepcopy(BASE if raw is None else raw), list(overrides), REGISTRY, **kwargs)


def parse(raw=None, *overrides):
    return parser(raw, *overrides).config


# ---- defaults, file formats, precedence -------------------------------------------------------

def test_missing_keys_get_their_documented_defaults():
    config = parse(MINIMAL)
    assert config["seed"] == 0
    assert config["n_gpu"] == 1
    assert config["metrics"] == []
    assert config["lr_scheduler"] is None
    assert config["arch"]["args"] == {}
    d = config["data_loader"]
    assert d["dataset"] == {"type": "DigitsDataset", "args": {"root": "data/"}}
    assert (d["valid_dataset"], d["test_dataset"], d["validation_split"], d["test_split"]) == (None, None, 0.0, 0.0)
    assert (d["batch_size"], d["shuffle"], d["num_workers"], d["prefetch_factor"]) == (32, True, "auto", 4)
    assert (d["train_transform"], d["eval_transform"]) == ([], [])
    t = config["trainer"]
    assert (t["epochs"], t["save_dir"], t["save_period"], t["verbosity"]) == (10, "saved/", 1, 2)
    assert (t["monitor"], t["early_stop"], t["tensorboard"], t["log_step"], t["len_epoch"]) == \
        ("off", 0, True, 10, None)


def test_parsing_touches_no_files(tmp_path):
    config = parser(None, f"trainer.save_dir={tmp_path / 'saved'}")
    assert not (tmp_path / "saved").exists()
    assert config.save_dir == tmp_path / "saved" / "models" / "Digits_CNN" / config.run_id


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_reads_like_the_json_one(tmp_path, suffix):
    path = tmp_path / f"config{suffix}"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False))
    assert load_config_file(path) == load_config_file(ROOT / "config.json") == BASE
    assert parse(load_config_file(path)) == parse(BASE)


def test_yaml_config_drives_a_dry_run(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE))
    call_main(train_script.main, ["-c", path, "--dry-run", f"trainer.save_dir={tmp_path / 'saved'}"])
    assert not (tmp_path / "saved").exists()


def test_precedence_command_line_over_file_over_defaults():
    assert "epochs" not in MINIMAL.get("trainer", {})
    assert parse(MINIMAL)["trainer"]["epochs"] == 10  # default
    assert BASE["trainer"]["epochs"] == 20
    assert parse(BASE)["trainer"]["epochs"] == 20  # file beats default
    assert parse(BASE, "trainer.epochs=3")["trainer"]["epochs"] == 3  # command line beats file
    assert parse(MINIMAL, "trainer.epochs=3")["trainer"]["epochs"] == 3  # and beats a default
    assert parse(BASE, "trainer.epochs=3", "trainer.epochs=4")["trainer"]["epochs"] == 4  # last one wins


def test_override_values_are_json_else_strings():
    config = parse(None, "optimizer.args.lr=0.01", "trainer.tensorboard=false", "name=my_run",
                   "lr_scheduler=null", "metrics=[\"accuracy\"]", "trainer.monitor=max val_accuracy")
    assert config["optimizer"]["args"]["lr"] == 0.01 and isinstance(config["optimizer"]["args"]["lr"], float)
    assert config["trainer"]["tensorboard"] is False
    assert config["name"] == "my_run"
    assert config["lr_scheduler"] is None
    assert config["metrics"] == ["accuracy"]
    assert config["trainer"]["monitor"] == "max val_accuracy"


def test_lr_and_bs_shortcuts(tmp_path):
    args = train_script.parse_args(["-c", "config.json", "--lr", "0.05", "--bs", "16",
                                    "trainer.epochs=3", f"trainer.save_dir={tmp_path}"])
    config, checkpoint, _ = train_script.build_config(args, REGISTRY)
    assert checkpoint is None
    assert config["optimizer"]["args"]["lr"] == 0.05
    assert config["data_loader"]["batch_size"] == 16
    assert config["trainer"]["epochs"] == 3
    assert list(tmp_path.iterdir()) == []  # building the config wrote nothing


def test_overrides_may_come_before_and_after_options():
    args = train_script.parse_args(["-c", "config.json", "trainer.epochs=3", "--lr", "0.01", "trainer.save_period=1"])
    assert {"trainer.epochs=3", "trainer.save_period=1", "optimizer.args.lr=0.01"} <= set(args.overrides)


def test_unknown_override_key_is_an_error_naming_close_matches():
    with pytest.raises(ConfigError) as e:
        parse(None, "trainer.epoch=3")
    assert "'trainer.epoch'" in str(e.value) and "trainer.epochs" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse(None, "optimizer.arg.lr=0.1")
    assert "optimizer.args" in str(e.value)


def test_constructor_parameter_can_be_set_without_plus():
    config = parser(None, "arch.args.dropout=0.1")
    assert config["arch"]["args"] == {"dropout": 0.1}
    assert config.init_obj("arch").dropout.p == 0.1
    # any {type, args} spec: the optimizer (a torch.optim class), the dataset, a dotted torch.nn loss
    config = parser(None, "optimizer.args.amsgrad=true", "data_loader.dataset.args.root=data",
                    'loss={"type": "torch.nn.CrossEntropyLoss", "args": {}}', "loss.args.label_smoothing=0.2")
    assert config["optimizer"]["args"] == {"lr": 0.002, "weight_decay": 0, "amsgrad": True}
    assert config["data_loader"]["dataset"]["args"] == {"root": "data"}
    assert config.init_ftn("loss").label_smoothing == 0.2


def test_plus_adds_a_key():
    config = parser(None, "+arch.args.dropout=0.1", "+optimizer.args.amsgrad=true")
    assert config["arch"]["args"]["dropout"] == 0.1
    assert config["optimizer"]["args"]["amsgrad"] is True
    assert config.init_obj("arch").dropout.p == 0.1


def test_a_key_added_with_plus_is_still_validated():
    with pytest.raises(ConfigError, match=r"trainer\.foo: unknown key"):
        parse(None, "+trainer.foo=1")
    with pytest.raises(ConfigError, match=r"arch\.args: .*bogus.*signature: DigitsModel\(num_classes=10, dropout=0\.25\)"):
        parse(None, "+arch.args.bogus=1")


def test_unknown_constructor_argument_without_plus_is_unknown_key():
    with pytest.raises(ConfigError, match=r"no key 'arch\.args\.bogus'"):
        parse(None, "arch.args.bogus=1")
    with pytest.raises(ConfigError, match=r"no key 'data_loader\.dataset\.args\.bogus'"):
        parse(None, "data_loader.dataset.args.bogus=1")


# ---- every config error: one line naming the key, exit 2, nothing written ---------------------

def _without(key):
    raw = copy.deepcopy(BASE)
    del raw[key]
    return raw


def _with(**changes):
    raw = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = raw
        *parents, last = path.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return raw


def case(id, raw, overrides, fragments):
    """A bad config: `raw` (a dict written to a file, or None for config.json) plus `overrides`;
    the error line must contain every one of `fragments`."""
    return pytest.param(raw, overrides, fragments, id=id)


ERRORS = [
    case("missing-loss", _without("loss"), [], ["loss: missing required key"]),
    case("missing-arch-type", _with(arch={"args": {}}), [], ["arch.type: missing required key"]),
    case("missing-dataset", _with(data_loader={"batch_size": 32}), [], ["data_loader.dataset: missing required key"]),
    case("missing-dataset-type", _with(data_loader__dataset={"args": {}}), [],
         ["data_loader.dataset.type: missing required key"]),
    case("unknown-top-level-key", {**_without("trainer"), "trainr": BASE["trainer"]}, [],
         ["trainr: unknown key", "trainer"]),
    case("unknown-trainer-key", _with(trainer__epoch=3), [], ["trainer.epoch: unknown key", "did you mean trainer.epochs"]),
    case("unknown-loader-key", _with(data_loader__batchsize=3), [],
         ["data_loader.batchsize: unknown key", "did you mean data_loader.batch_size"]),
    case("old-loader-shape", _with(data_loader={"type": "DigitsDataLoader", "args": {"data_dir": "data/"}}), [],
         ["data_loader.type: unknown key"]),
    case("epochs-string", _with(trainer__epochs="3"), [], ["trainer.epochs: expected int"]),
    case("epochs-bool", None, ["trainer.epochs=true"], ["trainer.epochs: expected int"]),
    case("shuffle-not-a-bool", None, ["data_loader.shuffle=1"], ["data_loader.shuffle: expected bool"]),
    case("metrics-not-a-list", _with(metrics="accuracy"), [], ["metrics: expected list"]),
    case("name-with-slash", None, ["name=a/b"], ["name: "]),
    # An unknown name lists the project's names, the allowlisted modules and how to add a name.
    case("unknown-arch", None, ["arch.type=Foo"],
         ["arch.type: unknown name 'Foo'", "DigitsModel", "LinearModel", "MnistModel", "torch.nn", "torchvision.models",
          "define it in any file under model/ or data_loader/"]),
    case("unknown-optimizer", None, ["optimizer.type=Adamm"],
         ["optimizer.type: unknown name", "Adamm", "did you mean torch.optim.Adam"]),
    case("unknown-loss", None, ["loss=mse"], ["loss: unknown name 'mse'", "cross_entropy", "nll_loss"]),
    case("unknown-metric", None, ['metrics=["accuracy", "f1"]'], ["metrics[1]: unknown name 'f1'", "top_k_acc"]),
    case("unknown-metric-spec", None, ['metrics=["accuracy", {"type": "F1"}]'], ["metrics[1].type: unknown name 'F1'"]),
    case("unknown-scheduler", None, ["lr_scheduler.type=Step"],
         ["lr_scheduler.type: unknown name", "Step", "did you mean torch.optim.lr_scheduler.StepLR"]),
    case("unknown-dataset", None, ["data_loader.dataset.type=Digits"], ["data_loader.dataset.type: unknown name 'Digits'"]),
    case("unknown-transform", None, ['data_loader.train_transform=[{"type": "RandomCropp"}]'],
         ["data_loader.train_transform[0].type: unknown name", "did you mean torchvision.transforms.v2.RandomCrop"]),
    case("bad-monitor-string", None, ["trainer.monitor=maximum val_accuracy"], ["trainer.monitor", "'maximum val_accuracy'"]),
    case("monitor-one-word", None, ["trainer.monitor=val_loss"], ["trainer.monitor", "'val_loss'"]),
    case("monitor-unknown-metric", None, ["trainer.monitor=max val_f1"], ["trainer.monitor", "val_f1"]),
    case("monitor-without-validation", None, ["data_loader.validation_split=0"],
         ["trainer.monitor", "validation_split"]),
    case("validation-split-one", None, ["data_loader.validation_split=1.0"], ["data_loader.validation_split: must be in [0, 1)"]),
    case("splits-leave-no-training-data", None, ["data_loader.validation_split=0.5", "data_loader.test_split=0.6"],
         ["data_loader", "no training samples"]),
    case("epochs-zero", None, ["trainer.epochs=0"], ["trainer.epochs: must be in [1, "]),
    case("save-period-zero", None, ["trainer.save_period=0"], ["trainer.save_period: must be in [1, "]),
    case("early-stop-negative", None, ["trainer.early_stop=-1"], ["trainer.early_stop: must be in [0, "]),
    case("len-epoch-zero", None, ["trainer.len_epoch=0"], ["trainer.len_epoch"]),
    case("verbosity", None, ["trainer.verbosity=5"], ["trainer.verbosity"]),
    case("arch-arg-not-taken", None, ["+arch.args.depth=3"],
         ["arch.args: ", "depth", "(signature: DigitsModel(num_classes=10, dropout=0.25))"]),
    case("optimizer-arg-not-taken", None, ["+optimizer.args.momentum=0.9"], ["optimizer.args: ", "momentum", "Adam("]),
    case("dataset-arg-not-taken", None, ["+data_loader.dataset.args.download=true"],
         ["data_loader.dataset.args: ", "download", "DigitsDataset("]),
    case("loss-arg-not-taken", None, ['loss={"type": "torch.nn.CrossEntropyLoss", "args": {"label_smoothin": 0.1}}'],
         ["loss.args: ", "label_smoothin", "CrossEntropyLoss("]),
    case("metric-arg-not-taken", None, ['metrics=[{"type": "MacroF1", "args": {"average": "micro"}}]'],
         ["metrics[0].args: ", "average", "MacroF1("]),
    case("metric-unknown-spec-key", None, ['metrics=[{"type": "accuracy", "nmae": "acc"}]'],
         ["metrics[0].nmae: unknown key"]),
    case("scheduler-interval", None, ["+lr_scheduler.interval=batch"], ["lr_scheduler.interval"]),
    case("override-without-value", None, ["trainer.epochs"], ["expected KEY.PATH=VALUE"]),
    case("override-unknown-key", None, ["trainer.epoch=3"], ["'trainer.epoch'", "trainer.epochs"]),
    case("override-old-loader-path", None, ["data_loader.args.batch_size=16"],
         ["no key 'data_loader.args'", "prefix with + to add a new key"]),
    case("missing-data-dir", None, ["data_loader.dataset.args.root=no/such/dir"],
         ["data_loader.dataset.args.root", "no/such/dir"]),
    # Names are looked up among the project's own classes and functions, then in an allowlist of
    # modules by dotted name: never an arbitrary import, a builtin, or a private or dunder name.
    case("arch-os.system", None, ["arch.type=os.system"], ["arch.type: unknown name 'os.system'"]),
    case("arch-eval", None, ["arch.type=eval"], ["arch.type: unknown name 'eval'"]),
    case("arch-nn-module", None, ["arch.type=nn"], ["arch.type: unknown name 'nn'"]),
    case("arch-allowlisted-module-itself", None, ["arch.type=torch.nn"], ["arch.type: unknown name 'torch.nn'"]),
    case("arch-submodule-of-allowlisted", None, ["arch.type=torchvision.models.resnet"],
         ["arch.type: unknown name 'torchvision.models.resnet'"]),
    case("arch-base-class", None, ["arch.type=BaseModel"], ["arch.type: unknown name 'BaseModel'"]),
    case("arch-private-part", None, ["arch.type=torch.nn._reduction"], ["arch.type: unknown name 'torch.nn._reduction'"]),
    case("dataset-__import__", None, ["data_loader.dataset.type=__import__"],
         ["data_loader.dataset.type: unknown name '__import__'"]),
    case("dataset-imported-class", None, ["data_loader.dataset.type=TensorDataset"],
         ["data_loader.dataset.type: unknown name 'TensorDataset'"]),
    case("dataset-outside-the-allowlist", None, ["data_loader.dataset.type=torch.utils.data.TensorDataset"],
         ["data_loader.dataset.type: unknown name 'torch.utils.data.TensorDataset'"]),
    case("optimizer-__class__", None, ["optimizer.type=__class__"], ["optimizer.type: unknown name '__class__'"]),
    case("optimizer-dunder-attribute", None, ["optimizer.type=torch.optim.__builtins__"],
         ["optimizer.type: unknown name 'torch.optim.__builtins__'"]),
    # The abstract bases in an allowlisted module are names, but not things a config can train with.
    case("optimizer-base-class", None, ["optimizer.type=Optimizer"],
         ["optimizer.type: torch.optim.Optimizer is not supported: it is the abstract base class"]),
    case("optimizer-base-class-with-args", None, ['optimizer={"type": "Optimizer", "args": {"defaults": {}}}'],
         ["optimizer.type: torch.optim.Optimizer is not supported: it is the abstract base class"]),
    case("scheduler-base-class", None, ['lr_scheduler={"type": "LRScheduler", "args": {}}'],
         ["lr_scheduler.type: torch.optim.lr_scheduler.LRScheduler is not supported: it is the abstract base class"]),
    case("loss-eval", None, ["loss=eval"], ["loss: unknown name 'eval'"]),
    case("loss-module", None, ["loss=F"], ["loss: unknown name 'F'"]),
    case("metric-__import__", None, ['metrics=["__import__"]'], ["metrics[0]: unknown name '__import__'"]),
    case("scheduler-os.system", None, ["lr_scheduler.type=os.system"], ["lr_scheduler.type: unknown name 'os.system'"]),
    case("transform-os.system", None, ['data_loader.eval_transform=[{"type": "os.system", "args": {"command": "x"}}]'],
         ["data_loader.eval_transform[0].type: unknown name 'os.system'"]),
    # Dotted names: only in the allowlisted modules (torch.nn, torch.optim, torch.optim.lr_scheduler,
    # torchvision.models, torchvision.datasets, torchvision.transforms.v2).
    case("dotted-os.path.join", None, ["arch.type=os.path.join"],
         ["arch.type: unknown name 'os.path.join'", "a dotted name in torch.nn, torch.optim"]),
    case("dotted-torch.load", None, ["arch.type=torch.load"], ["arch.type: unknown name 'torch.load'"]),
    case("dotted-torchvision.io", None, ["arch.type=torchvision.io.read_file"],
         ["arch.type: unknown name 'torchvision.io.read_file'"]),
    case("dotted-functional", None, ["loss=torch.nn.functional.nll_loss"],
         ["loss: unknown name 'torch.nn.functional.nll_loss'"]),
    case("dotted-optimizer-outside", None, ["optimizer.type=torch.load"],
         ["optimizer.type: unknown name", "torch.load"]),
    # A typo in an allowlisted module's name suggests its close matches.
    case("dotted-typo", None, ["loss=torch.nn.CrossEntropyLos"],
         ["loss: unknown name 'torch.nn.CrossEntropyLos'", "did you mean torch.nn.CrossEntropyLoss"]),
    case("dotted-typo-spec", None, ['arch={"type": "torchvision.models.resnet81", "args": {}}'],
         ["arch.type: unknown name 'torchvision.models.resnet81'",
          "did you mean torchvision.models.resnet18"]),
    # Reachable but refused, with the reason.
    case("optimizer-lbfgs", None, ["optimizer.type=LBFGS"],
         ["optimizer.type: ", "LBFGS is not supported", "closure"]),
    case("optimizer-lbfgs-dotted", None, ["optimizer.type=torch.optim.LBFGS"],
         ["optimizer.type: ", "LBFGS is not supported", "closure"]),
    # A class of an allowlisted module used where it does not fit is refused before anything is built.
    case("arch-an-optimizer", None, ["arch.type=torch.optim.Adam"], ["arch.args: ", "'params'", "torch.optim.Adam("]),
    # A bad constructor value is rejected by the constructor; that, too, is one line.
    case("optimizer-lr-not-a-number", None, ["optimizer.args.lr=fast"], ["optimizer.args", "Adam rejected"]),
    case("batch-size-zero", None, ["data_loader.batch_size=0"], ["data_loader.batch_size: must be in [1, "]),
    case("num-workers-negative", None, ["data_loader.num_workers=-1"],
         ['data_loader.num_workers: must be "auto" or in [0, 1024], got -1']),
    case("num-workers-word", None, ["data_loader.num_workers=many"],
         ['data_loader.num_workers: must be "auto" or in [0, 1024], got "many"']),
    case("num-workers-bool", None, ["data_loader.num_workers=true"], ["data_loader.num_workers"]),
    case("prefetch-zero", None, ["data_loader.prefetch_factor=0"], ["data_loader.prefetch_factor: must be in [1, "]),
    case("dropout-out-of-range", None, ["arch.args.dropout=2"], ["arch.args", "DigitsModel rejected"]),
    # What the programs pass themselves (the model's parameters, the optimizer) cannot come from the
    # config, even though they are constructor parameters (which may otherwise be set without +).
    case("optimizer-params-from-config", None, ["optimizer.args.params=[]"],
         ["optimizer.args: ", "multiple values for argument 'params'"]),
    case("scheduler-optimizer-from-config", None, ["lr_scheduler.args.optimizer=1"],
         ["lr_scheduler.args: ", "multiple values for argument 'optimizer'"]),
    # The seed is a top-level setting (it seeds the split and the order); the loader has none.
    case("loader-seed", None, ["data_loader.seed=3"], ["override 'data_loader.seed=3'", "no key"]),
    case("loader-seed-in-file", _with(data_loader__seed=3), [], ["data_loader.seed: unknown key"]),
]


@pytest.mark.parametrize("raw, overrides, fragments", ERRORS)
def test_config_error_is_one_line_and_writes_nothing(tmp_path, capsys, raw, overrides, fragments):
    config = ROOT / "config.json"
    if raw is not None:
        config = tmp_path / "config.json"
        config.write_text(json.dumps(raw))
    else:
        overrides = ["trainer.epochs=1", *overrides]  # short, should a case wrongly start training
    save_dir = tmp_path / "saved"
    code, err = main_error(train_script.main, ["-c", config, f"trainer.save_dir={save_dir}", *overrides], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert not save_dir.exists()


def test_malformed_json_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "x"\n  "seed": 1\n}\n')  # missing comma: line 3, column 3
    code, err = main_error(train_script.main, ["-c", path, f"trainer.save_dir={tmp_path / 'saved'}"], capsys)
    assert code == 2
    assert err.strip() == f"error: {path}:3:3: invalid JSON: Expecting ',' delimiter"
    assert not (tmp_path / "saved").exists()


def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\narch: {type: DigitsModel\nseed: 1\n")  # unclosed flow mapping
    code, err = main_error(train_script.main, ["-c", path, f"trainer.save_dir={tmp_path / 'saved'}"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:3:5: invalid YAML"), err
    assert not (tmp_path / "saved").exists()


def test_unreadable_config_file(tmp_path, capsys):
    code, err = main_error(train_script.main, ["-c", tmp_path / "nope.json"], capsys)
    assert code == 2
    assert err.startswith(f"error: cannot read config {tmp_path / 'nope.json'}")


def test_config_left_unchanged_by_overrides():
    raw = copy.deepcopy(BASE)
    ConfigParser(raw, ["trainer.epochs=3", "+arch.args.dropout=0.1", "data_loader.dataset.args.root=x"], REGISTRY)
    assert raw == BASE


# ---- the same through the real command line ---------------------------------------------------

def test_cli_missing_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_without("loss")))
    result = run_train("-c", path, f"trainer.save_dir={tmp_path / 'saved'}")
    assert_user_error(result, "loss: missing required key")
    assert not (tmp_path / "saved").exists()


def test_cli_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x",}')
    result = run_train("-c", path, f"trainer.save_dir={tmp_path / 'saved'}")
    assert_user_error(result, f"{path}:1:14: invalid JSON")
    assert not (tmp_path / "saved").exists()


def test_cli_rejects_dangerous_type_name(tmp_path):
    result = run_train("-c", "config.json", f"trainer.save_dir={tmp_path / 'saved'}", "arch.type=os.system")
    assert_user_error(result, "arch.type: unknown name 'os.system'", "DigitsModel")
    assert not (tmp_path / "saved").exists()


# ---- the name rules: the project's names, then an allowlist of modules by dotted name -------------

def test_torchvision_model_resolves_validates_and_builds():
    import torchvision
    config = parser(None, 'arch={"type": "torchvision.models.resnet18", "args": {"num_classes": 10}}')
    assert config.resolve("arch") is torchvision.models.resnet18
    model = config.init_obj("arch")
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 10
    # resnet18 takes **kwargs, so a misspelt argument passes validation; building it is still one error
    config = parser(None, 'arch={"type": "torchvision.models.resnet18", "args": {"num_classs": 10}}')
    with pytest.raises(ConfigError, match=r"arch\.args: torchvision\.models\.resnet18 rejected .*num_classs"):
        config.init_obj("arch")


def test_bare_names_fall_back_to_the_sections_module():
    import torchvision
    config = parser(None, "optimizer.type=AdamW", "lr_scheduler.type=CosineAnnealingLR", 'lr_scheduler.args={"T_max": 5}',
                    'data_loader.train_transform=[{"type": "RandomCrop", "args": {"size": 8, "padding": 1}}]')
    assert config.resolve("optimizer") is torch.optim.AdamW
    assert config.resolve("lr_scheduler") is torch.optim.lr_scheduler.CosineAnnealingLR
    assert config.resolve("data_loader.train_transform.0") is torchvision.transforms.v2.RandomCrop
    # the project's own names come first; a bare name has no fallback where a section has no default module
    assert config.resolve("arch").__module__ == "model.model"
    with pytest.raises(ConfigError, match=r"arch\.type: unknown name 'Linear'"):
        parse(None, "arch.type=Linear")  # torch.nn.Linear needs its dotted name
    parse(None, 'arch={"type": "torch.nn.Linear", "args": {"in_features": 64, "out_features": 10}}')


def test_loss_given_as_a_spec_is_built_with_its_args():
    config = parser(None, 'loss={"type": "torch.nn.CrossEntropyLoss", "args": {"label_smoothing": 0.1}}')
    loss = config.init_ftn("loss")
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    config = parser(None, 'loss={"type": "nll_loss", "args": {}}')
    assert config.init_ftn("loss") is config.resolve("loss")


def test_metric_names_are_snake_case_or_given():
    config = parser(None, 'metrics=["accuracy", {"type": "MacroF1"}, {"type": "top_k_acc", "args": {"k": 5}, "name": "top5"}]',
                    "trainer.monitor=max val_macro_f1")
    assert config.metric_names == ["accuracy", "macro_f1", "top5"]
    top5 = config.init_ftn("metrics.2")
    output = torch.log_softmax(torch.arange(10.0).repeat(2, 1), dim=1)
    assert top5(output, torch.tensor([5, 4])).item() == 0.5  # k=5 reached the function
    with pytest.raises(ConfigError, match=r"trainer\.monitor: 'max val_MacroF1'"):
        parse(None, 'metrics=[{"type": "MacroF1"}]', "trainer.monitor=max val_MacroF1")
    with pytest.raises(ConfigError, match=r"metrics: two metrics are named 'accuracy'"):
        parse(None, 'metrics=["accuracy", {"type": "accuracy"}]')
    parse(None, 'metrics=["accuracy", {"type": "accuracy", "name": "acc2"}]')


def test_a_name_defined_in_two_project_files_is_ambiguous(tmp_path, monkeypatch):
    package = tmp_path / "dup_names_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for file in ("a.py", "b.py"):
        (package / file).write_text("class Net:\n    pass\n")
    (package / "c.py").write_text("from dup_names_pkg.a import Net as Imported\n\n\ndef _hidden():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry(packages=("dup_names_pkg",))
    with pytest.raises(ConfigError, match=r"arch\.type: 'Net' is defined in both dup_names_pkg/a\.py and dup_names_pkg/b\.py"):
        registry.resolve("Net", "arch.type")
    for name in ("Imported", "_hidden"):  # imported, or private: not the package's names
        with pytest.raises(ConfigError, match="unknown name"):
            registry.resolve(name, "arch.type")


# ---- later fixes: mistakes that used to slip through -------------------------------------------

def test_plateau_scheduler_mode_must_match_the_monitor():
    with pytest.raises(ConfigError, match=r"lr_scheduler\.args\.mode: must match trainer\.monitor's 'max'"):
        parse(None, 'lr_scheduler={"type": "ReduceLROnPlateau", "args": {}}')
    parse(None, 'lr_scheduler={"type": "ReduceLROnPlateau", "args": {"mode": "max"}}')


@pytest.mark.parametrize("run_id", ["../x", "a/b", ".."])
def test_run_id_is_a_plain_name(tmp_path, capsys, run_id):
    code, err = main_error(train_script.main, ["-c", "config.json", "--run-id", run_id,
                                               f"trainer.save_dir={tmp_path / 'saved'}"], capsys)
    assert code == 2 and err.startswith("error: --run-id:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "saved").exists()


def test_a_save_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_train("-c", "config.json", f"trainer.save_dir={tmp_path / 'file'}", "trainer.epochs=1")
    assert_user_error(result, "trainer.save_dir: cannot create")


@pytest.mark.parametrize("override", ["trainer.monitor=off", "data_loader.batch_size=16",
                                      "trainer.len_epoch=5", "trainer.accumulate_steps=2", "loss=cross_entropy"])
def test_resume_refuses_changes_that_would_alter_the_run(digits_run, override):
    result = run_train("-r", digits_run.model_dir, override)
    assert_user_error(result, "a resumed run keeps its")


@pytest.mark.parametrize("name", ["two\nlines", "gpj.\u202eexe", "tab\there"])
def test_a_name_that_would_make_logs_lie_is_refused(tmp_path, capsys, name):
    import train
    for argv in (["--run-id", name], [f"name={name}"]):
        status, err = main_error(train.main, ["-c", "config.json", f"trainer.save_dir={tmp_path}", *argv], capsys)
        assert status == 2 and "printable characters" in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())
