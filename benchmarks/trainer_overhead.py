"""How much slower is training through the template's Trainer than a hand-written PyTorch loop?

    python benchmarks/trainer_overhead.py [--workload digits|mnist|mlp|all] [--runs 5] [--epochs N]

Runs the same model, data and epochs through (a) a plain loop and (b) trainer.Trainer built from a
config via parse_config.ConfigParser, alternating a/b, b/a, ... in one process (after one short
untimed warm-up pair), and prints training samples per second for each side and the median of the
per-pair ratios Trainer/raw (adjacent runs, so slow drift from other CPU users cancels). It also
prints best/best, the fastest Trainer run over the fastest raw run: contention only ever slows a run,
so on a shared machine that is the steadier estimate. Each run's line shows the load average.

Workloads:
  digits  config.json as shipped (DigitsModel, DigitsDataset split by its validation_split and test_split,
          batch 32, Adam, StepLR, metrics accuracy + top_k_acc, validation every epoch); the splits are
          made by base.base_data_loader.make_datasets and batched by base.BaseDataLoader as train.py
          does; 20 epochs per run unless --epochs.
  mnist   configs/mnist.json (MnistModel, batch 128, Adam/amsgrad, StepLR, same metrics), but with
          the data replaced by 60,000 seeded random 1x28x28 samples (10 classes) held in memory,
          split 54,000 train / 6,000 validation (the config's validation_split 0.1), each split a
          TensorDataset in a base.BaseDataLoader (in-process, no transforms) given to the Trainer directly;
          1 epoch per run unless --epochs.
  mlp     a tiny MLP on feature vectors: config.json's optimizer, scheduler, batch and trainer settings with
          torchvision.ops.MLP(32 -> 64 -> 10) (added to the names a config may use, as a project's
          allowed_modules.txt would), cross-entropy and accuracy, on 20,000 seeded random 32-feature rows
          whose label is the largest of their first 10 features, split 18,000 / 2,000, in memory; steps of
          well under a millisecond, so whatever the Trainer does per step or per epoch weighs most here;
          5 epochs per run unless --epochs.

What counts as "like with like":
  * Same work the user asked for, on both sides: the same model (built after the same
    torch.manual_seed, so the same initial weights and dropout masks), optimizer and LR scheduler
    from the same config, the same loader objects (so the same batches in the same order, by the
    same tensor-indexing iteration), the same number of optimizer steps, and each epoch the same
    validation pass (eval mode, no_grad, loss plus the configured metrics over the whole validation
    split, read on the host once). Same torch.set_num_threads. The script checks the outcome:
    both sides must end with bit-identical weights (printed as "weights identical").
  * Trainer overhead is everything else the Trainer does by default: loss/metric sums on every
    training batch, tqdm bars (the running loss on them every log_step steps: with a bar there is no
    per-step debug line), per-log_step TensorBoard scalars, the per-epoch image grid, metrics.csv,
    info.log and the checkpoints its config asks for. The raw loop does none of that (a hand-written
    loop does not have to).
  * Both sides run the plain step: the config's trainer.amp, accumulate_steps, clip_grad_norm and
    compile must be at their defaults (the script stops otherwise). trainer.early_stop is set to 0 so
    both sides run every epoch; the monitor (and the model_best.pth it writes) stays on.
  * samples/s = training samples of a run (epochs x training split) / the run's timed seconds,
    validation included. Timed: the training call only (raw_fit() / Trainer.train()). Untimed on both sides: building
    the data, model and optimizer; for the Trainer also ConfigParser, make_run_dirs() and
    setup_logging(). The Trainer writes into a temporary save_dir that is deleted afterwards.
  * The Trainer's console (log lines on stdout, tqdm bars on stderr) goes to /dev/null through a
    stream that reports itself as a terminal, so the bars are on (tqdm turns them off when stderr is
    not a TTY) and all their formatting and writing is timed, but not a terminal's rendering; pass
    --show-output to send it to the real console instead.

--profile additionally runs the Trainer once per workload under cProfile and prints the top functions.
--breakdown additionally runs the Trainer once per workload with a clock around each part of its epoch (the
training pass, validation, the checkpoint, callbacks, the epoch's log lines and its metrics.csv row and
TensorBoard scalars) and prints milliseconds per epoch, beside the raw loop's whole epoch.
"""
import argparse
import contextlib
import cProfile
import gc
import io
import itertools
import json
import logging
import os
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from base import BaseDataLoader  # noqa: E402
from base.base_data_loader import make_datasets  # noqa: E402
from logger import setup_logging  # noqa: E402
from parse_config import ConfigParser, load_config_file  # noqa: E402
from utils.run import build_callbacks, build_loss_and_metrics  # noqa: E402
from utils.registry import Registry  # noqa: E402

# name: (config file, default epochs per run)
WORKLOADS = {"digits": ("config.json", 20), "mnist": ("configs/mnist.json", 1), "mlp": ("config.json", 5)}
MNIST_SAMPLES, MNIST_VALID = 60_000, 6_000
MLP_SAMPLES, MLP_VALID, MLP_FEATURES = 20_000, 2_000, 32
WARMUP_STEPS = 20
REGISTRY = Registry()  # the names configs may build, as train.py's
REGISTRY.allowed += ("torchvision.ops",)  # the mlp workload's model, as a project's allowed_modules.txt adds it


class _TTYSink(io.TextIOWrapper):
    """/dev/null that says it is a terminal, so tqdm draws its bars into it."""

    def isatty(self):
        return True


@contextlib.contextmanager
def console_to_devnull(enabled=True):
    if not enabled:
        yield
        return
    sink = _TTYSink(open(os.devnull, "wb"), line_buffering=True)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = sink
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        sink.close()


def close_logging():
    root = logging.getLogger()
    for handler in root.handlers[:]:
        handler.close()
        root.removeHandler(handler)


def load_workload(name, seed_data=0):
    """The workload's raw config (a dict) and its (train, valid) loaders, built once and shared by both sides."""
    raw = load_config_file(REPO / WORKLOADS[name][0])
    raw["data_loader"]["dataset"]["args"]["root"] = str(REPO / "data")
    if name == "digits":  # as train.py builds them
        config = ConfigParser(raw, [], REGISTRY)
        cfg = config["data_loader"]
        sets = make_datasets(config)
        loader_args = dict(batch_size=cfg["batch_size"], num_workers=cfg["num_workers"], seed=config["seed"])
        train = BaseDataLoader(sets["train"], shuffle=cfg["shuffle"], **loader_args)
        valid = BaseDataLoader(sets["valid"], even_shards=False, **loader_args) if sets["valid"] is not None else None
        return raw, train, valid
    g = torch.Generator().manual_seed(seed_data)
    if name == "mlp":
        raw.update(name="Tabular_MLP", loss="torch.nn.CrossEntropyLoss", metrics=["accuracy"], callbacks=[],
                   arch={"type": "torchvision.ops.MLP", "args": {"in_channels": MLP_FEATURES,
                                                                 "hidden_channels": [64, 10]}})
        images = torch.randn(MLP_SAMPLES, MLP_FEATURES, generator=g)
        labels, n_train = images[:, :10].argmax(1), MLP_SAMPLES - MLP_VALID
    else:
        images = torch.randn(MNIST_SAMPLES, 1, 28, 28, generator=g)
        labels, n_train = torch.randint(0, 10, (MNIST_SAMPLES,), generator=g), MNIST_SAMPLES - MNIST_VALID
    batch, seed = raw["data_loader"]["batch_size"], raw.get("seed", 0)
    train = BaseDataLoader(TensorDataset(images[:n_train], labels[:n_train]), batch, shuffle=True, seed=seed)
    valid = BaseDataLoader(TensorDataset(images[n_train:], labels[n_train:]), batch, shuffle=False, seed=seed,
                           even_shards=False)
    return raw, train, valid


# Trainer options the raw loop does not mirror: they must be off (their defaults) in the configs.
PLAIN_STEP = {"amp": None, "accumulate_steps": 1, "clip_grad_norm": None, "compile": False}


def make_config(raw, save_dir, epochs, run_id, len_epoch=None, extra=()):
    # early_stop=0: both sides must run every epoch (on random labels val_loss soon stops improving);
    # the monitor itself, and the model_best.pth it drives, stay on. `extra`: --set overrides (the Trainer's side).
    overrides = [f"trainer.save_dir={save_dir}", f"trainer.epochs={epochs}",
                 f"trainer.len_epoch={json.dumps(len_epoch)}", "trainer.early_stop=0", *extra]
    config = ConfigParser(raw, overrides, REGISTRY, run_id=run_id)
    changed = [k for k, v in PLAIN_STEP.items() if config["trainer"].get(k, v) != v]
    if changed:
        raise SystemExit(f"trainer.{changed[0]} is set in the config; the raw loop here is a plain "
                         f"full-precision step, so the comparison would not be like with like")
    return config


def build(config, device):
    """Model, loss, metrics, optimizer and scheduler as train.py builds them, after torch.manual_seed.

    metrics: {name: metric object} as the Trainer takes them (utils.run.build_loss_and_metrics: functions
    wrapped as BatchMean), plus the plain metric functions a hand-written loop calls.
    """
    torch.manual_seed(config["seed"])
    model = config.init_obj("arch").to(device)
    criterion, metrics = build_loss_and_metrics(config, device)
    functions = [config.init_ftn(f"metrics.{i}") for i in range(len(config.metric_names))]
    if any(hasattr(f, "update") for f in functions):
        raise SystemExit("a metric in the config is a Metric class; the raw loop here calls plain metric functions")
    optimizer = config.init_obj("optimizer", [p for p in model.parameters() if p.requires_grad])
    scheduler = config.init_scheduler(optimizer) if config["lr_scheduler"] else None
    return model, criterion, metrics, functions, optimizer, scheduler


RAW_CLOCK = {}  # seconds of the raw loop's parts, over its timed runs (for --breakdown)


def tick(part, since):
    now = time.perf_counter()
    RAW_CLOCK[part] = RAW_CLOCK.get(part, 0.0) + now - since
    return now


def raw_fit(config, device, train_loader, valid_loader, save_dir=None):
    """The loop a user writes by hand. Returns (model, optimizer steps taken, seconds).

    It does the work the config asks for, as a hand-written loop would: the configured metrics on
    every training batch (summed on the device, read once per epoch), a validation pass, and with
    `save_dir` a torch.save of model and optimizer at the epochs the Trainer saves at (every
    save_period, the last epoch, every epoch with save_last, and whenever the monitored metric improves). save_dir=None (--bare)
    leaves out the training metrics and the saves.
    """
    model, criterion, _, metrics, optimizer, scheduler = build(config, device)
    names = config.metric_names
    t = config["trainer"]
    per_step = scheduler is not None and config["lr_scheduler"]["interval"] == "step"
    steps_per_epoch = t["len_epoch"]  # None: a full pass (timed runs); set for the warm-up
    mode, monitored = t["monitor"].split() if t["monitor"] != "off" else ("off", None)
    best = float("inf") if mode == "min" else float("-inf")
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    steps = 0
    start = time.perf_counter()
    for epoch in range(1, t["epochs"] + 1):
        clock = time.perf_counter()
        model.train()
        train_loader.set_epoch(epoch - 1)
        train_sums, n_train = torch.zeros(1 + len(metrics), device=device), 0
        for data, target in itertools.islice(train_loader, steps_per_epoch):
            data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
            optimizer.zero_grad()
            output = model(data)
            loss = criterion(output, target)
            loss.backward()
            optimizer.step()
            if per_step:
                scheduler.step()
            steps += 1
            if save_dir is not None:
                train_sums += torch.stack([loss.detach(), *(m(output, target) for m in metrics)]) * len(target)
                n_train += len(target)
        log = dict(zip(["loss", *names], (train_sums / max(n_train, 1)).tolist()))
        clock = tick("training pass", clock)
        if valid_loader is not None:
            model.eval()
            sums, n = torch.zeros(1 + len(metrics), device=device), 0
            with torch.no_grad():
                for data, target in valid_loader:
                    data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
                    output = model(data)
                    values = torch.stack([criterion(output, target), *(m(output, target) for m in metrics)])
                    sums += values * len(target)
                    n += len(target)
            log.update(zip(["val_loss", *("val_" + m for m in names)], (sums / n).tolist()))
        clock = tick("validation", clock)
        if scheduler is not None and not per_step:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(log[monitored])
            else:
                scheduler.step()
        if save_dir is not None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            if epoch % t["save_period"] == 0 or epoch == t["epochs"] or t["save_last"]:
                torch.save(state, save_dir / f"checkpoint-epoch{epoch}.pth")
            if mode != "off" and (log[monitored] < best if mode == "min" else log[monitored] > best):
                best = log[monitored]
                torch.save(state, save_dir / "model_best.pth")
        tick("checkpoint", clock)  # with the scheduler's step
    if device.type == "cuda":
        torch.cuda.synchronize()  # the Trainer ends on a host sync too (its epoch averages)
    return model, steps, time.perf_counter() - start


def trainer_fit(config, device, train_loader, valid_loader, show_output=False, profiler=None):
    """The template's Trainer with the config's settings. Returns (model, optimizer steps, seconds)."""
    model, criterion, metrics, _, optimizer, scheduler = build(config, device)
    config.make_run_dirs()
    try:
        with console_to_devnull(not show_output):
            setup_logging(config.log_dir, config["trainer"]["verbosity"])
            trainer = config.resolve("trainer")(model, criterion, metrics, optimizer, config, device, train_loader,
                                                valid_loader, scheduler, build_callbacks(config))
            start = time.perf_counter()
            if profiler is not None:
                profiler.runcall(trainer.train)
            else:
                trainer.train()
            seconds = time.perf_counter() - start
    finally:
        close_logging()
    return model, trainer.global_step, seconds


def ema_step_cost(raw, device, steps=2000) -> float:
    """Microseconds one update of callbacks/ema.py (its on_step_end: a fused lerp over the parameters, a copy
    of the buffers) takes on the workload's model, timed apart from training."""
    from types import SimpleNamespace
    from callbacks.ema import EMA
    trainer = SimpleNamespace(model=ConfigParser(raw, [], REGISTRY).init_obj("arch").to(device), sharded=False,
                              distributed=False)
    ema = EMA(decay=0.999)
    ema.on_train_start(trainer)
    for i in range(steps + 100):  # the first 100 are a warm-up
        if i == 100:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        ema.on_step_end(trainer, None, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def bench(name, args, device, tmp):
    raw, train_loader, valid_loader = load_workload(name)
    epochs = args.epochs or WORKLOADS[name][1]
    batch = train_loader.sampler.batch_size
    print(f"\n## {name}: {len(train_loader.dataset)} training samples, batch {batch}, {epochs} epoch(s) per run, "
          f"{len(valid_loader.dataset) if valid_loader else 0} validation samples", flush=True)

    def run(side, i, len_epoch=None, n_epochs=epochs, profiler=None):
        config = make_config(raw, tmp / name, n_epochs, f"run{i}_{side}", len_epoch, args.set)
        gc.collect()
        if side == "raw":
            save_dir = None if args.bare else tmp / name / f"raw{i}"
            return raw_fit(config, device, train_loader, valid_loader, save_dir)
        return trainer_fit(config, device, train_loader, valid_loader, args.show_output, profiler)

    for side in ("raw", "trainer"):  # untimed warm-up: imports, allocator and oneDNN caches
        run(side, "warmup", len_epoch=WARMUP_STEPS, n_epochs=1)
    RAW_CLOCK.clear()

    raw_rates, trainer_rates, ratios, trainer_parts = [], [], [], {}
    n_samples = epochs * len(train_loader.dataset)  # full passes (no drop_last)
    with trainer_clocks(trainer_parts) if args.breakdown else contextlib.nullcontext():
        for i in range(args.runs):
            sides = ("raw", "trainer") if i % 2 == 0 else ("trainer", "raw")
            result = {side: run(side, i) for side in sides}
            (raw_model, raw_steps, raw_s), (tr_model, tr_steps, tr_s) = result["raw"], result["trainer"]
            if raw_steps != tr_steps:
                raise RuntimeError(f"{name}: raw loop took {raw_steps} steps, the Trainer {tr_steps}")
            raw_rates.append(n_samples / raw_s)
            trainer_rates.append(n_samples / tr_s)
            ratios.append(trainer_rates[-1] / raw_rates[-1])
            raw_step_us = raw_s / raw_steps * 1e6
            print(f"run {i + 1} ({sides[0]} first): raw {raw_s:7.2f} s {raw_rates[-1]:7.0f}/s | trainer {tr_s:7.2f} s "
                  f"{trainer_rates[-1]:7.0f}/s | ratio {ratios[-1]:.3f} | weights identical: "
                  f"{'yes' if same_weights(raw_model, tr_model) else 'NO'} | load avg {load_average()}", flush=True)
            shutil.rmtree(tmp / name, ignore_errors=True)
    print(f"EMA update (callbacks/ema.py): {ema_step_cost(raw, device):.0f} us per optimizer step, against "
          f"{raw_step_us:.0f} us per step of the raw loop (its last run, validation and saves included)", flush=True)

    if args.breakdown:
        print_breakdown(trainer_parts, sum(n_samples / r for r in trainer_rates), RAW_CLOCK,
                        sum(n_samples / r for r in raw_rates), args.runs * epochs)
    if args.profile:
        profiler = cProfile.Profile()
        run("trainer", "profile", profiler=profiler)
        # The Trainer's own code and what it calls besides the model; torch's kernels are the same on both sides.
        ours = "|".join([re.escape(str(REPO)) + r"/(base|trainer|logger|utils|model/metric)", "tqdm", "tensorboard",
                         r"logging/__init__", "grad_scaler"])
        print(f"\ncProfile of one Trainer run ({name}): framework, tqdm, TensorBoard and logging functions, "
              f"top 40 by cumulative time")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(ours, 40)
        shutil.rmtree(tmp / name, ignore_errors=True)
    return (statistics.median(raw_rates), statistics.median(trainer_rates), statistics.median(ratios),
            min(ratios), max(ratios), max(trainer_rates) / max(raw_rates))


@contextlib.contextmanager
def trainer_clocks(seconds: dict):
    """While active, a clock around each part of a Trainer epoch adds its seconds to `seconds`. A part called
    inside another (on_step_end in the training pass, the "Saved" line in the checkpoint) counts in the outer one."""
    import logging as logging_module
    from base.base_trainer import BaseTrainer
    from logger.visualization import RunOutputs
    parts = {"training pass": (BaseTrainer, "train_epoch"), "validation": (BaseTrainer, "evaluate"),
             "checkpoint": (BaseTrainer, "_save_checkpoint"),
             "callbacks at the epoch's end": (BaseTrainer, "callback"), "log lines": (logging_module.Logger, "info"),
             "metrics.csv row, TensorBoard scalars": (RunOutputs, "write_epoch")}
    saved, inside = {name: getattr(*where) for name, where in parts.items()}, []

    def clocked(name, fn):
        def timed(*a, **kw):
            if inside:
                return fn(*a, **kw)
            inside.append(name)
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                inside.pop()
        return timed
    for name, (owner, attr) in parts.items():
        setattr(owner, attr, clocked(name, saved[name]))
    try:
        yield
    finally:
        for name, (owner, attr) in parts.items():
            setattr(owner, attr, saved[name])


def print_breakdown(trainer_parts, trainer_total, raw_parts, raw_total, epochs):
    """Milliseconds per epoch of each part, both sides (seconds summed over the timed runs)."""
    print(f"\nmilliseconds per epoch, mean of the timed runs: {'':8s}   Trainer    raw loop")
    order = ["training pass", "validation", "checkpoint", "callbacks at the epoch's end", "log lines",
             "metrics.csv row, TensorBoard scalars"]
    rows = [*(name for name in order if name in trainer_parts), "the rest", "whole epoch"]
    trainer_parts = {**trainer_parts, "the rest": trainer_total - sum(trainer_parts.values()),
                     "whole epoch": trainer_total}
    raw_parts = {**raw_parts, "the rest": raw_total - sum(raw_parts.values()), "whole epoch": raw_total}
    for name in rows:
        raw = f"{raw_parts[name] / epochs * 1e3:10.2f}" if name in raw_parts else f"{'-':>10s}"
        print(f"  {name:45s} {trainer_parts[name] / epochs * 1e3:10.2f}  {raw}")


IMPORT_PROBE = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import train, test, parse_config, trainer, logger, utils, base, model.model, model.loss, model.metric
import base.base_metric, data_loader.datasets, utils.registry, utils.config_file, utils.checkpoint, utils.preemption
print(t1 - t0, time.perf_counter() - t1)
"""


def import_overhead():
    """(seconds to import torch, seconds the template's own modules add), medians of 5 fresh processes."""
    import subprocess
    times = [subprocess.run([sys.executable, "-c", IMPORT_PROBE], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split() for _ in range(5)]
    return statistics.median(float(t[0]) for t in times), statistics.median(float(t[1]) for t in times)


def load_average() -> str:
    """The 1-minute load average: above the thread count, other processes share the CPU and the runs are noisy."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time the template's Trainer against a hand-written loop.")
    p.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    p.add_argument("--runs", type=int, default=5, help="timed runs per side, alternating (default 5)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: digits 20, mnist 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch.set_num_threads for both sides (default: torch's default here)")
    p.add_argument("--show-output", action="store_true", help="let the Trainer's logs and bars reach the console")
    p.add_argument("--profile", action="store_true", help="also cProfile one Trainer run per workload")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of a Trainer epoch")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="an override for both sides' config, e.g. callbacks=[...] to time callbacks (repeatable)")
    p.add_argument("--bare", action="store_true",
                   help="raw loop without training metrics and checkpoint saves (shows what those cost)")
    args = p.parse_args(argv)
    if args.runs < 1 or (args.epochs is not None and args.epochs < 1):
        p.error("--runs and --epochs must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # as the configs' n_gpu: 1 picks
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    tmp = Path(tempfile.mkdtemp(prefix="trainer_overhead_"))
    try:
        results = {name: bench(name, args, device, tmp) for name in names}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ntorch {torch.__version__} | CPU: {cpu_model()} | device: {device} | threads: {torch.get_num_threads()} "
          f"| median of {args.runs} alternating runs | raw loop: {'bare' if args.bare else 'same metrics and saves'}")
    torch_s, template_s = import_overhead()
    print(f"import torch: {torch_s:.3f} s; importing the template's modules on top of it: {template_s:.3f} s "
          "(median of 5 fresh interpreters)")
    print("\n| workload | raw samples/s | trainer samples/s | ratio trainer/raw | ratio range | best/best |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (raw_rate, tr_rate, ratio, low, high, best) in results.items():
        print(f"| {name} | {raw_rate:,.0f} | {tr_rate:,.0f} | {ratio:.3f} | {low:.3f}-{high:.3f} | {best:.3f} |")
    print("\nsamples/s: median over the runs; ratio: median of the per-run ratios (each pair ran back to back);\n"
          "best/best: fastest trainer run over fastest raw run, which CPU contention (it only slows) disturbs least.")


if __name__ == "__main__":
    main()
