"""Evaluate a checkpoint on the test split: python test.py -r saved/models/NAME/RUN/model_best.pth

Prints loss and metrics and writes test_metrics.json beside the checkpoint; creates no run directory.
"""
import argparse
import json
import logging
import os

from cli import run_main
from logger import setup_logging
from parse_config import ConfigParser
from trainer.trainer import evaluate, progress_bar
from utils import prepare_device, write_json
from utils.errors import ConfigError
from utils.checkpoint import find_checkpoint, load_checkpoint, load_model_state


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
    config = ConfigParser(checkpoint["config"], args.overrides, run_id=checkpoint["run_id"], resume=True)
    setup_logging(None, config["trainer"]["verbosity"])
    logger = logging.getLogger("test")

    data_loader = config.init_obj("data_loader", seed=config["seed"], training=False)
    if data_loader.n_samples == 0:
        raise ConfigError(f"data_loader.args.test_split: the test split of {config['data_loader']['type']} is empty")
    model = config.init_obj("arch")
    load_model_state(model, checkpoint, path)
    device = prepare_device(config["n_gpu"], logger)
    model = model.to(device)
    criterion = config.init_ftn("loss", config["loss"])
    metric_fns = [config.init_ftn("metrics", name) for name in config["metrics"]]

    bar = progress_bar(data_loader, desc="test")
    results = evaluate(model, bar, criterion, metric_fns, device)
    results["n_samples"] = data_loader.n_samples
    out = path.parent / "test_metrics.json"
    write_json({"checkpoint": path.name, **results}, out)
    print(json.dumps(results, indent=2))
    print(f"Wrote {out}")
    return results


if __name__ == "__main__":
    run_main(main)
