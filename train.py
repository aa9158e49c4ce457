"""Train a model from a config: python train.py -c config.json [KEY.PATH=VALUE ...]"""
import argparse
import copy
import gc
import logging
import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import utils.dist as dist
from base.base_data_loader import describe, make_datasets, make_loader
from logger import setup_logging
from parse_config import ConfigParser, load_config_file, with_defaults
from utils import prepare_device, seed_everything
from utils.checkpoint import find_checkpoint, latest_checkpoint, load_checkpoint, load_model_state
from utils.config_file import spec_of
from utils.errors import ConfigError, TrainingError, UserError, run_main
from utils.preemption import Preempted
from utils.registry import Registry
from utils.run import build_callbacks, build_loss_and_metrics
from utils.sharding import shard


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a model from a JSON or YAML config.")
    p.add_argument("-c", "--config", help="config file (.json, .yaml or .yml)")
    p.add_argument("-r", "--resume", help="checkpoint, or run directory (its newest); with -c: fine-tune from it")
    p.add_argument("-d", "--device", help="GPU ids to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--run-id", help="name of the run (default: a timestamp)")
    p.add_argument("--lr", type=float, help="shortcut for optimizer.args.lr=LR")
    p.add_argument("--bs", type=int, help="shortcut for data_loader.batch_size=BS")
    p.add_argument("--auto-resume", action="store_true", help="with -c: resume the newest checkpoint of run "
                   "--run-id (default: of the newest run of this name), or start that run if it has none")
    p.add_argument("--dry-run", action="store_true", help="build all, 2 training and 2 validation batches, no output")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                   help="override a config value (JSON, else a string); +KEY.PATH=VALUE adds a key")
    args = p.parse_intermixed_args(argv)  # overrides may come before and after options
    if not args.config and not args.resume:
        p.error("give a config with -c, or a checkpoint to resume with -r")
    if args.auto_resume and (args.resume or not args.config):
        p.error("--auto-resume goes with -c and without -r")
    args.overrides += [f"optimizer.args.lr={args.lr}"] * (args.lr is not None)
    args.overrides += [f"data_loader.batch_size={args.bs}"] * (args.bs is not None)
    return args


# What a resumed run takes from its checkpoint: overriding these would be silently undone (the optimizer's
# state holds its lr), would move the run's place in the data, or would make it a different run. How the
# batches are loaded may change: it does not change them.
LOADING_ONLY = ("num_workers", "prefetch_factor")
FIXED_ON_RESUME = ("name", "seed", "arch", "optimizer", "lr_scheduler", "loss", "metrics", "callbacks", "data_loader",
                   "trainer.type", "trainer.monitor", "trainer.len_epoch", "trainer.accumulate_steps",
                   "trainer.strategy")


def _changed_on_resume(config, saved):
    """The first FIXED_ON_RESUME key whose value differs from the checkpoint's config, or None."""
    def get(tree, key):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return {k: v for k, v in tree.items() if k not in LOADING_ONLY} if key == "data_loader" and tree else tree
    return next((key for key in FIXED_ON_RESUME if get(config, key) != get(saved, key)), None)


def build_config(args, registry):
    """The run's ConfigParser, the checkpoint to start from (None for a fresh run) and its path."""
    path = checkpoint = None
    if args.config:  # a new run (fine-tuning from the checkpoint's weights if -r is given too)
        config = ConfigParser(load_config_file(args.config), args.overrides, registry, run_id=args.run_id)
        runs = Path(config["trainer"]["save_dir"]) / "models" / config["name"]
        if args.auto_resume:  # the newest checkpoint this number of processes can resume, if any
            path, checkpoint = latest_checkpoint(runs, args.run_id, usable_by=int(os.environ.get("WORLD_SIZE", 1)))
    if args.resume:
        path = find_checkpoint(args.resume)
        checkpoint = load_checkpoint(path)
    if checkpoint is None or not args.auto_resume and args.config:
        return config, checkpoint, path
    run_dir = path.resolve().parent  # the run goes on in the checkpoint's directory (a copied run in the copy)
    if run_dir.parent.name == "superseded":  # an abandoned future, taken up again: back in its run
        run_dir = run_dir.parent.parent
    if args.run_id and args.run_id != run_dir.name:
        raise ConfigError(f"--run-id: a resumed run keeps its id ({run_dir.name}); use -c with -r to start a new run")
    config = ConfigParser(checkpoint["config"], args.overrides, registry, run_id=run_dir.name, resume=True,
                          run_dir=run_dir)
    changed = _changed_on_resume(config.config, with_defaults(copy.deepcopy(checkpoint["config"])))  # keys added since
    if changed:
        raise ConfigError(f"{changed}: a resumed run keeps its {', '.join(FIXED_ON_RESUME)} (as in its checkpoint);"
                          " to change them start a new run from the checkpoint with -c CONFIG -r CHECKPOINT")
    return config, checkpoint, path


def setup_device(n_gpu) -> torch.device:
    """Join torchrun's process group if launched by it; else pick one device for this process."""
    device = dist.init_distributed(use_cuda=n_gpu > 0 and torch.cuda.is_available())
    gpus = torch.cuda.device_count()
    if device is None and n_gpu > 1 and gpus > 1:
        raise ConfigError(f"n_gpu: {n_gpu} GPUs take one process each; launch with: torchrun --standalone "
                          f"--nproc_per_node={min(n_gpu, gpus)} train.py {' '.join(sys.argv[1:])}")
    return device or prepare_device(n_gpu)


def dry_run(trainer, batches):
    """Train `batches` batches from the start of the next epoch (even when resuming mid-epoch) and validate on
    `batches` batches; write nothing."""
    trainer.cfg = {**trainer.cfg, "save_every_steps": 0}  # no checkpoints: a dry run has no run directory
    trainer.batches_done = 0
    trainer.callback("on_train_start")
    try:
        train_log = trainer.train_epoch(trainer.epoch + 1, batches)[0]
    except IndexError as e:
        if (error := label_error(e)) is None:
            raise
        raise error from None
    trainer.logger.info("dry run: %d training batches: %s", batches, train_log)
    if trainer.valid_data_loader is not None:
        valid = trainer.evaluate(trainer.valid_data_loader, max_batches=batches)
        trainer.logger.info("dry run: %d validation batches: %s", batches, valid)


def label_error(e):
    """The one-line TrainingError for CrossEntropyLoss's IndexError "Target 6 is out of bounds" (on the CPU): a label
    the model has no output for. None for any other error, which keeps its traceback."""
    if isinstance(e, IndexError) and "out of bounds" in str(e):
        return TrainingError(f"{e} (is a label >= the model's number of outputs? compare arch.args.num_classes with "
                             "the data's labels)")
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device  # before anything touches CUDA
    config, checkpoint, checkpoint_path = build_config(args, Registry())
    verbosity = config["trainer"]["verbosity"] if int(os.environ.get("RANK", 0)) == 0 else 0  # other ranks: warnings
    setup_logging(None, verbosity)  # console only until the run has a directory
    device = setup_device(config["n_gpu"])
    # What exists now (mostly the imports' objects, which live as long as the process) is left out of Python's
    # full garbage collections: one over the whole heap takes 0.1-0.2 s, and DataLoader workers fork after this.
    gc.freeze()
    try:
        run(args, config, checkpoint, checkpoint_path, device, verbosity)
        if dist.is_distributed():  # all done before any process tears the group down (gloo may abort a rank)
            torch.distributed.barrier()
    finally:
        dist.cleanup()
        gc.unfreeze()  # collectable again, for a caller that goes on (tests, a notebook)


def run(args, config, checkpoint, checkpoint_path, device, verbosity):
    logger = logging.getLogger("train")
    seed_everything(config["seed"] + dist.rank())  # rank-distinct dropout; data order is seeded separately

    # Build everything before creating any directory, so a bad config leaves nothing behind.
    datasets = make_datasets(config)
    if datasets["train"] is None:
        raise ConfigError(f"data_loader.dataset: the training split of {config['data_loader']['dataset']['type']} "
                          "is empty")
    if datasets["valid"] is None and (config.monitor[1] or "").startswith("val_"):
        raise ConfigError(f"trainer.monitor: {config.monitor[1]} needs validation data, but the validation split "
                          "is empty")
    data_loader = make_loader(config, datasets["train"], True, device)
    valid_data_loader = make_loader(config, datasets["valid"], device=device)
    logger.info("Data: %d training, %d validation samples; %d loader worker(s) (data_loader.num_workers: %s)",
                len(datasets["train"]), len(datasets["valid"] or ()), data_loader.num_workers,
                config["data_loader"]["num_workers"])
    model, data = config.init_obj("arch"), describe(datasets)
    n_outputs, classes = spec_of(config["arch"])["args"].get("num_classes"), data["class_names"]
    if classes and isinstance(n_outputs, int) and n_outputs != len(classes) and dist.is_main_process():
        logger.warning("arch.args.num_classes is %d, but the data has %d classes", n_outputs, len(classes))
    if checkpoint is not None and not config.resume:  # fine-tuning: weights only
        load_model_state(model, checkpoint["model"], checkpoint_path, checkpoint["arch"])
    logger.info(model)
    model = model.to(device)
    if dist.is_distributed() and config["trainer"]["strategy"] == "fsdp":  # each process holds 1/N of the model
        model = shard(model, config["trainer"], device)
    elif dist.is_distributed():  # gradients are averaged across processes in backward()
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    backend = config["trainer"]["compile"]
    if backend:  # checkpoints still hold the bare module's keys (utils.unwrap_model)
        model = torch.compile(model, **({} if backend is True else {"backend": backend}))
    criterion, metrics = build_loss_and_metrics(config, device)
    optimizer = config.init_obj("optimizer", [p for p in model.parameters() if p.requires_grad])
    lr_scheduler = config.init_scheduler(optimizer) if config["lr_scheduler"] else None
    trainer = config.resolve("trainer")(model, criterion, metrics, optimizer, config, device, data_loader,
                                        valid_data_loader, lr_scheduler, build_callbacks(config), data)
    if config.resume:
        trainer.load_state_dict(checkpoint, checkpoint_path)
    if args.dry_run:
        return dry_run(trainer, batches=2)

    lock = error = None
    if dist.is_main_process():  # rank 0 creates, locks and logs to the run directory
        try:
            lock = config.make_run_dirs(reuse=args.auto_resume)
            setup_logging(config.log_dir, verbosity)
        except UserError as e:
            error = str(e)
    config.run_id, error = dist.gather_objects((config.run_id, error))[0]  # a suffix rank 0 added; its error
    if error:
        raise ConfigError(error)
    start = "resumed" if config.resume else "fine-tuning" if checkpoint is not None else "from scratch"
    logger.info("Run %s (%s%s): checkpoints in %s, logs in %s", config.run_id, start,
                f" from {checkpoint_path}" * (checkpoint is not None), config.save_dir, config.log_dir)
    try:
        trainer.train()
    except Preempted as e:
        sys.exit(128 + e.signum)
    except OSError as e:  # e.g. a full disk while writing a checkpoint or a log
        error = TrainingError(f"{os.fsdecode(e.filename or config.log_dir)}: {e.strerror or e}; the checkpoints "
                              "saved before are intact")
        if e.errno is None:  # not the file system's: e.g. PIL's unreadable image (from a worker: with its traceback)
            error = TrainingError(f"data: {str(e).strip().splitlines()[-1]}; the checkpoints saved before are intact")
        logger.error("error: %s", error, extra={"file_only": True})
        raise error from None
    except (TrainingError, UserError) as e:  # e.g. a non-finite loss, or a DataError found while iterating
        logger.error("error: %s", e, extra={"file_only": True})  # for info.log; run_main prints it
        raise
    except Exception as e:  # a bug: keep the traceback in info.log
        error = label_error(e)
        logger.exception("Training failed", extra={"file_only": error is not None})  # a label's: one console line
        if error is not None:
            raise TrainingError(f"{error}; the traceback is in info.log") from None
        raise
    finally:
        if lock is not None:
            lock.close()  # releases the run


if __name__ == "__main__":
    run_main(main)
