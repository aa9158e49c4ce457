"""Evaluate a checkpoint on the test split: python test.py -r saved/models/NAME/RUN/model_best.pth

Prints loss and metrics and writes test_metrics.json beside the checkpoint; creates no run directory.
"""
import argparse
import json
import logging
import os

from base.base_data_loader import make_datasets, make_loader
from logger import setup_logging
from parse_config import ConfigParser
from train import build_loss_and_metrics
from trainer import Trainer
from utils import prepare_device, write_json
from utils.checkpoint import find_checkpoint, load_checkpoint, load_model_state
from utils.errors import ConfigError, run_main
from utils.registry import Registry


def _changed_split(config, saved):
    """The first key that decides which samples the test split cut from `dataset` holds, and that differs
    from the checkpoint's config; None when the test data is a dataset of its own."""
    def split(c):
        d = c.get("data_loader", {})
        return {"seed": c.get("seed"), "data_loader.dataset.type": (d.get("dataset") or {}).get("type"),
                "data_loader.validation_split": d.get("validation_split"), "data_loader.test_split": d.get("test_split"),
                "data_loader.valid_dataset": d.get("valid_dataset") is None}
    if config["data_loader"]["test_dataset"] is not None:
        return None
    new, old = split(config), split(saved)
    return next((key for key in new if new[key] != old[key]), None)


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split.")
    p.add_argument("-r", "--resume", required=True, help="checkpoint file, or a run directory (its newest)")
    p.add_argument("-d", "--device", help="GPU ids to use, e.g. 0 (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="override a value of the checkpoint's config")
    args = p.parse_intermixed_args(argv)
    if args.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device

    path = find_checkpoint(args.resume)
    checkpoint = load_checkpoint(path)
    config = ConfigParser(checkpoint["config"], args.overrides, Registry(), run_id=checkpoint["run_id"], resume=True)
    setup_logging(None, config["trainer"]["verbosity"])
    logger = logging.getLogger("test")

    changed = _changed_split(config.config, checkpoint["config"])
    if changed:
        raise ConfigError(f"{changed}: changing it would put training samples into the test split; evaluate on "
                          "other data with data_loader.test_dataset")
    test_set = make_datasets(config)["test"]
    if test_set is None:
        raise ConfigError("data_loader: no test data (set data_loader.test_split or data_loader.test_dataset)")
    device = prepare_device(config["n_gpu"], logger)
    data_loader = make_loader(config, test_set, device=device)
    model = config.init_obj("arch")
    load_model_state(model, checkpoint, path)
    model = model.to(device)
    criterion, metrics = build_loss_and_metrics(config, device)
    trainer = Trainer(model, criterion, metrics, None, config, device)

    results = trainer.evaluate(data_loader, desc="test")
    results["n_samples"] = len(test_set)
    out = path.parent / "test_metrics.json"
    write_json({"checkpoint": path.name, "overrides": args.overrides, **results}, out)
    print(json.dumps(results, indent=2))
    print(f"Wrote {out}")
    return results


if __name__ == "__main__":
    run_main(main)
