"""Evaluate a checkpoint on the test split: python test.py -r saved/models/NAME/RUN/model_best.pth

Prints loss and metrics and writes test_metrics.json beside the checkpoint; creates no run directory.
"""
import argparse
import json
import logging
import os

from base.base_data_loader import fingerprint, make_datasets, make_loader
from logger import setup_logging
from utils import write_json
from utils.checkpoint import check_data
from utils.errors import ConfigError, run_main
from utils.run import load_run


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split.")
    p.add_argument("-r", "--resume", required=True, help="checkpoint file, or a run directory (its newest)")
    p.add_argument("-d", "--device", help="GPU ids to use, e.g. 0 (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--weights", default="model", help="the weights to test: model (default), or a callback's (ema)")
    p.add_argument("--bs", type=int, help="shortcut for data_loader.batch_size=BS")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="override a value of the checkpoint's config")
    args = p.parse_intermixed_args(argv)
    if args.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device
    args.overrides += [f"data_loader.batch_size={args.bs}"] * (args.bs is not None)
    setup_logging(None, 1)  # console only: load_run's warnings (e.g. no GPU) show before the config is read
    run = load_run(args.resume, args.overrides, args.weights, logger=logging.getLogger("test"))
    config = run.config
    setup_logging(None, config["trainer"]["verbosity"])
    test_set = make_datasets(config)["test"]
    if test_set is None:
        raise ConfigError("data_loader: no test data (set data_loader.test_split or data_loader.test_dataset)")
    if config["data_loader"]["test_dataset"] == run.checkpoint["config"]["data_loader"]["test_dataset"]:
        check_data(run.checkpoint, run.path, {"test": fingerprint(test_set)}, ["test"], "it may hold training "
                   "samples now; evaluate on other data with data_loader.test_dataset")
    results = run.trainer.evaluate(make_loader(config, test_set, device=run.device), desc="test")
    results["n_samples"] = len(test_set)
    out = run.path.parent / "test_metrics.json"
    write_json({"checkpoint": run.path.name, "weights": args.weights, "overrides": args.overrides, **results}, out)
    print(json.dumps(results, indent=2))
    print(f"Wrote {out}")
    return results


if __name__ == "__main__":
    run_main(main)
