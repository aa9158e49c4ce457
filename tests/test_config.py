"""Config parsing: defaults, JSON/YAML, precedence, overrides, and one-line rejection of bad configs."""
import copy
import json

import pytest
import yaml

import train as train_script
from conftest import ROOT, assert_user_error, call_main, main_error, run_train
from parse_config import ConfigParser, load_config_file
from utils.errors import ConfigError

BASE = json.loads((ROOT / "config.json").read_text())
MINIMAL = {
    "name": "m",
    "arch": {"type": "DigitsModel"},
    "data_loader": {"type": "DigitsDataLoader", "args": {"data_dir": "data/", "batch_size": 32}},
    "optimizer": {"type": "SGD", "args": {"lr": 0.1}},
    "loss": "nll_loss",
}


def parse(raw=None, *overrides):
    return ConfigParser(copy.deepcopy(BASE if raw is None else raw), list(overrides)).config


# ---- defaults, file formats, precedence -------------------------------------------------------

def test_missing_keys_get_their_documented_defaults():
    config = parse(MINIMAL)
    assert config["seed"] == 0
    assert config["n_gpu"] == 1
    assert config["metrics"] == []
    assert config["lr_scheduler"] is None
    assert config["arch"]["args"] == {}
    t = config["trainer"]
    assert (t["epochs"], t["save_dir"], t["save_period"], t["verbosity"]) == (10, "saved/", 1, 2)
    assert (t["monitor"], t["early_stop"], t["tensorboard"], t["log_step"], t["len_epoch"]) == \
        ("off", 0, True, 10, None)


def test_parsing_touches_no_files(tmp_path):
    parser = ConfigParser(copy.deepcopy(BASE), [f"trainer.save_dir={tmp_path / 'saved'}"])
    assert not (tmp_path / "saved").exists()
    assert parser.save_dir == tmp_path / "saved" / "models" / "Digits_CNN" / parser.run_id


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_reads_like_the_json_one(tmp_path, suffix):
    path = tmp_path / f"config{suffix}"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False))
    assert load_config_file(path) == load_config_file(ROOT / "config.json") == BASE
    assert ConfigParser(load_config_file(path)).config == ConfigParser(copy.deepcopy(BASE)).config


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
    config, checkpoint, _ = train_script.build_config(args)
    assert checkpoint is None
    assert config["optimizer"]["args"]["lr"] == 0.05
    assert config["data_loader"]["args"]["batch_size"] == 16
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
    parser = ConfigParser(copy.deepcopy(BASE), ["arch.args.dropout=0.1"])
    assert parser["arch"]["args"] == {"dropout": 0.1}
    assert parser.init_obj("arch").dropout.p == 0.1


def test_plus_adds_a_key():
    parser = ConfigParser(copy.deepcopy(BASE), ["+arch.args.dropout=0.1", "+optimizer.args.amsgrad=true"])
    assert parser["arch"]["args"]["dropout"] == 0.1
    assert parser["optimizer"]["args"]["amsgrad"] is True
    assert parser.init_obj("arch").dropout.p == 0.1


def test_a_key_added_with_plus_is_still_validated():
    with pytest.raises(ConfigError, match=r"trainer\.foo: unknown key"):
        parse(None, "+trainer.foo=1")
    with pytest.raises(ConfigError, match=r"arch\.args: .*bogus.*signature: DigitsModel\(num_classes=10, dropout=0\.25\)"):
        parse(None, "+arch.args.bogus=1")


def test_unknown_constructor_argument_without_plus_is_unknown_key():
    with pytest.raises(ConfigError, match=r"no key 'arch\.args\.bogus'"):
        parse(None, "arch.args.bogus=1")


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
    case("unknown-top-level-key", {**_without("trainer"), "trainr": BASE["trainer"]}, [],
         ["trainr: unknown key", "trainer"]),
    case("unknown-trainer-key", _with(trainer__epoch=3), [], ["trainer.epoch: unknown key", "did you mean trainer.epochs"]),
    case("epochs-string", _with(trainer__epochs="3"), [], ["trainer.epochs: expected int"]),
    case("epochs-bool", None, ["trainer.epochs=true"], ["trainer.epochs: expected int"]),
    case("metrics-not-a-list", _with(metrics="accuracy"), [], ["metrics: expected list"]),
    case("name-with-slash", None, ["name=a/b"], ["name: "]),
    case("unknown-arch", None, ["arch.type=Foo"],
         ["arch.type: unknown name 'Foo'", "DigitsModel", "LinearModel", "MnistModel"]),
    case("unknown-optimizer", None, ["optimizer.type=Adamm"], ["optimizer.type: unknown name 'Adamm'", "Adam", "SGD"]),
    case("unknown-loss", None, ["loss=mse"], ["loss: unknown name 'mse'", "cross_entropy", "nll_loss"]),
    case("unknown-metric", None, ['metrics=["accuracy", "f1"]'], ["metrics[1]: unknown name 'f1'", "top_k_acc"]),
    case("unknown-scheduler", None, ["lr_scheduler.type=Step"], ["lr_scheduler.type: unknown name 'Step'", "StepLR"]),
    case("bad-monitor-string", None, ["trainer.monitor=maximum val_accuracy"], ["trainer.monitor", "'maximum val_accuracy'"]),
    case("monitor-one-word", None, ["trainer.monitor=val_loss"], ["trainer.monitor", "'val_loss'"]),
    case("monitor-unknown-metric", None, ["trainer.monitor=max val_f1"], ["trainer.monitor", "val_f1"]),
    case("monitor-without-validation", None, ["data_loader.args.validation_split=0"],
         ["trainer.monitor", "validation_split"]),
    case("epochs-zero", None, ["trainer.epochs=0"], ["trainer.epochs: must be >= 1"]),
    case("save-period-zero", None, ["trainer.save_period=0"], ["trainer.save_period: must be >= 1"]),
    case("early-stop-negative", None, ["trainer.early_stop=-1"], ["trainer.early_stop: must be >= 0"]),
    case("len-epoch-zero", None, ["trainer.len_epoch=0"], ["trainer.len_epoch"]),
    case("verbosity", None, ["trainer.verbosity=5"], ["trainer.verbosity"]),
    case("arch-arg-not-taken", None, ["+arch.args.depth=3"],
         ["arch.args: ", "depth", "(signature: DigitsModel(num_classes=10, dropout=0.25))"]),
    case("optimizer-arg-not-taken", None, ["+optimizer.args.momentum=0.9"], ["optimizer.args: ", "momentum", "Adam("]),
    case("loader-arg-set-by-program", None, ["data_loader.args.seed=3"], ["data_loader.args", "seed"]),
    case("scheduler-interval", None, ["+lr_scheduler.interval=batch"], ["lr_scheduler.interval"]),
    case("override-without-value", None, ["trainer.epochs"], ["expected KEY.PATH=VALUE"]),
    case("override-unknown-key", None, ["trainer.epoch=3"], ["'trainer.epoch'", "trainer.epochs"]),
    case("missing-data-dir", None, ["data_loader.args.data_dir=no/such/dir"], ["data_loader.args.data_dir", "no/such/dir"]),
    # Names are looked up only among the template's own classes: never an import or a builtin.
    case("arch-os.system", None, ["arch.type=os.system"], ["arch.type: unknown name 'os.system'"]),
    case("arch-eval", None, ["arch.type=eval"], ["arch.type: unknown name 'eval'"]),
    case("arch-nn-module", None, ["arch.type=nn"], ["arch.type: unknown name 'nn'"]),
    case("arch-base-class", None, ["arch.type=BaseModel"], ["arch.type: unknown name 'BaseModel'"]),
    case("loader-__import__", None, ["data_loader.type=__import__"], ["data_loader.type: unknown name '__import__'"]),
    case("loader-imported-class", None, ["data_loader.type=TensorDataset"], ["data_loader.type: unknown name"]),
    case("optimizer-__class__", None, ["optimizer.type=__class__"], ["optimizer.type: unknown name '__class__'"]),
    case("optimizer-base-class", None, ["optimizer.type=Optimizer"], ["optimizer.type: unknown name 'Optimizer'"]),
    case("loss-eval", None, ["loss=eval"], ["loss: unknown name 'eval'"]),
    case("loss-module", None, ["loss=F"], ["loss: unknown name 'F'"]),
    case("metric-__import__", None, ['metrics=["__import__"]'], ["metrics[0]: unknown name '__import__'"]),
    case("scheduler-os.system", None, ["lr_scheduler.type=os.system"], ["lr_scheduler.type: unknown name 'os.system'"]),
    # A bad constructor value is rejected by the constructor; that, too, is one line.
    case("optimizer-lr-not-a-number", None, ["optimizer.args.lr=fast"], ["optimizer.args", "Adam rejected"]),
    case("batch-size-zero", None, ["data_loader.args.batch_size=0"],
         ["data_loader.args", "batch_size must be a positive integer"]),
    case("dropout-out-of-range", None, ["arch.args.dropout=2"], ["arch.args", "DigitsModel rejected"]),
    # Arguments the programs pass themselves cannot be set from the config.
    case("loader-training-flag", None, ["data_loader.args.training=false"],
         ["override 'data_loader.args.training=false'", "no key"]),
    case("loader-training-in-file", _with(data_loader__args__training=False), [],
         ["data_loader.args.training: set by the program"]),
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
    ConfigParser(raw, ["trainer.epochs=3", "+arch.args.dropout=0.1"])
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
    assert_user_error(result, "trainer.save_dir: cannot create the run's directories")


@pytest.mark.parametrize("override", ["trainer.monitor=off", "data_loader.args.batch_size=16",
                                      "trainer.len_epoch=5", "trainer.accumulate_steps=2", "loss=cross_entropy"])
def test_resume_refuses_changes_that_would_alter_the_run(digits_run, override):
    result = run_train("-r", digits_run.model_dir, override)
    assert_user_error(result, "a resumed run keeps its")
