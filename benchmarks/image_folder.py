"""The template against a hand-tuned DataLoader loop on real image files, decoded and augmented in workers.

    python benchmarks/image_folder.py [--pairs 8] [--images 2000] [--epochs 2] [--set KEY.PATH=VALUE ...]

It writes an ImageFolder of PNGs (48-80 px, 10 classes, a class-dependent tint) into a temporary
directory, then runs both sides alternately, each in a fresh process, `--pairs` times:

  raw       this file with --side raw: the script a careful user writes with torch and torchvision only.
            ImageFolder, a seeded 10% validation split, RandomResizedCrop(48, scale 0.5-1), horizontal
            flip, ToImage, ToDtype, Normalize (validation: Resize 48, CenterCrop 48, ...),
            DataLoader(shuffle=True, num_workers=2, persistent_workers=True, prefetch_factor=4,
            pin_memory on CUDA), SmallCNN (model/model.py), Adam, cross-entropy, batch 64; per batch
            the loss and accuracy sums, per epoch a validation pass and torch.save of a checkpoint.
  template  `python train.py -c <config>` with the same data, transforms, model, optimizer and batch,
            and everything else at the template's defaults (num_workers "auto", per-sample seeded
            augmentation, metrics, TensorBoard, info.log, metrics.csv, atomic checkpoints, monitor);
            run through this file with --side template, which only wraps BaseTrainer.train and
            BaseTrainer._optimizer_step with clocks and then calls train.py's own main.

Per run: training throughput = training samples x epochs / seconds of the fit (every epoch with its
validation and checkpoint, from just before the first batch is asked for to after the last save);
wall time = launch to exit of the process; start-up = launch to the end of the first optimizer step
(imports, folder scan, worker start, first batch); CPU per step = CPU seconds of the main process, and of
its live children (the DataLoader workers), over the fit, per optimizer step. Printed per pair with the load
average, and as median and range of the template/raw ratios (and of the start-up difference).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BATCH, LR, VALID = 64, 1e-3, 0.1


def make_images(root: Path, n: int, classes=10, seed=0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 120, size=(classes, 3))
    for i in range(n):
        c = i % classes
        w, h = rng.integers(48, 81, size=2)
        pixels = (rng.integers(0, 136, size=(h, w, 3)) + tints[c]).astype(np.uint8)
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def template_config(root, save_dir, epochs):
    def transform(train):
        head = [{"type": "RandomResizedCrop", "args": {"size": 48, "scale": [0.5, 1.0]}},
                {"type": "RandomHorizontalFlip"}] if train else \
            [{"type": "Resize", "args": {"size": 48}}, {"type": "CenterCrop", "args": {"size": 48}}]
        return head + [{"type": "ToImage"}, {"type": "ToDtype", "args": {"dtype": "torch.float32", "scale": True}},
                       {"type": "Normalize", "args": {"mean": MEAN, "std": STD}}]
    return {
        "name": "ImageFolder_SmallCNN", "seed": 0,
        "arch": {"type": "SmallCNN", "args": {"num_classes": 10}},
        "data_loader": {"dataset": {"type": "torchvision.datasets.ImageFolder", "args": {"root": str(root)}},
                        "validation_split": VALID, "batch_size": BATCH,
                        "train_transform": transform(True), "eval_transform": transform(False)},
        "optimizer": {"type": "Adam", "args": {"lr": LR}},
        "loss": "torch.nn.CrossEntropyLoss", "metrics": ["accuracy"],
        "callbacks": [{"type": "InputImages"}],  # as the shipped configs have it (the former trainer.log_images)
        "trainer": {"epochs": epochs, "save_dir": str(save_dir), "monitor": "max val_accuracy"},
    }


def cpu_seconds():
    """(CPU seconds of this process, of its live child processes: the DataLoader workers), from /proc."""
    tick, mine, children = os.sysconf("SC_CLK_TCK"), time.process_time(), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # a process that ended meanwhile
            continue
        if int(fields[1]) == os.getpid():  # ppid; utime and stime follow at fields 11 and 12
            children += (int(fields[11]) + int(fields[12])) / tick
    return mine, children


def side_raw(root, save_dir, epochs):
    """The hand-tuned loop. Prints {"first_step", "fit_seconds", "train_samples"}."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    sys.path.insert(0, str(REPO))
    from model.model import SmallCNN

    torch.manual_seed(0)
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train_tf = v2.Compose([v2.RandomResizedCrop(48, scale=(0.5, 1.0)), v2.RandomHorizontalFlip(), *tail])
    eval_tf = v2.Compose([v2.Resize(48), v2.CenterCrop(48), *tail])
    train_full, valid_full = ImageFolder(root, transform=train_tf), ImageFolder(root, transform=eval_tf)
    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(0)).tolist()
    n_valid = round(len(order) * VALID)
    train_set, valid_set = Subset(train_full, order[n_valid:]), Subset(valid_full, order[:n_valid])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(batch_size=BATCH, num_workers=2, persistent_workers=True, prefetch_factor=4,
              pin_memory=device.type == "cuda")
    train_loader, valid_loader = DataLoader(train_set, shuffle=True, **kw), DataLoader(valid_set, **kw)
    model = SmallCNN(num_classes=10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = torch.nn.CrossEntropyLoss()
    first_step = None
    start, cpu = time.perf_counter(), cpu_seconds()
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, correct = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            output = model(x)
            loss = criterion(output, y)
            loss.backward()
            optimizer.step()
            first_step = first_step or time.time()
            loss_sum += loss.item() * len(y)
            correct += (output.argmax(1) == y).sum().item()
        model.eval()
        valid_correct = 0
        with torch.no_grad():
            for x, y in valid_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                valid_correct += (model(x).argmax(1) == y).sum().item()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                   Path(save_dir) / f"checkpoint-epoch{epoch}.pth")
    fit, cpu = time.perf_counter() - start, [b - a for a, b in zip(cpu, cpu_seconds())]
    print(json.dumps({"first_step": first_step, "fit_seconds": fit, "fit_end": time.time(), "cpu": cpu,
                      "steps": len(train_loader) * epochs,
                      "train_samples": len(train_set) * epochs, "valid_accuracy": valid_correct / len(valid_set)}))


def side_template(config_path, overrides):
    """train.py's main with clocks on the fit and the first optimizer step. Prints as side_raw does."""
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import base.base_trainer as bt
    import train
    clocks = {}
    step, fit = bt.BaseTrainer._optimizer_step, bt.BaseTrainer.train

    def timed_step(self):
        step(self)
        clocks.setdefault("first_step", time.time())

    def timed_fit(self):
        start, cpu = time.perf_counter(), cpu_seconds()
        try:
            return fit(self)
        finally:
            clocks["fit_seconds"], clocks["fit_end"] = time.perf_counter() - start, time.time()
            clocks["cpu"], clocks["steps"] = [b - a for a, b in zip(cpu, cpu_seconds())], self.global_step
            clocks["train_samples"] = len(self.data_loader.dataset) * self.epoch
    bt.BaseTrainer._optimizer_step, bt.BaseTrainer.train = timed_step, timed_fit
    train.run_main(train.main, ["-c", str(config_path), "--run-id", "run", *overrides])
    print(json.dumps(clocks))


def seeding_cost(root):
    """Microseconds per sample: the template's per-sample seeding alone (an identity transform on ready
    samples, seeded by (epoch, index) against unseeded), and one sample's decode plus augmentation."""
    import timeit

    import torch
    sys.path.insert(0, str(REPO))
    from base.base_data_loader import Transformed, make_datasets
    from parse_config import ConfigParser
    from utils.registry import Registry
    torch.set_num_threads(1)  # as in a worker
    ready = [(torch.zeros(3), 0)] * 64
    keys = [(0, i) for i in range(64)]
    seeded, plain = Transformed(ready, lambda s: s, seed=0), Transformed(ready, lambda s: s)
    extra = min(timeit.repeat(lambda: seeded.__getitems__(keys), number=20, repeat=9)) - \
        min(timeit.repeat(lambda: plain.__getitems__(list(range(64))), number=20, repeat=9))
    train = make_datasets(ConfigParser(template_config(root, "unused", 1), [], Registry()))["train"]
    full = min(timeit.repeat(lambda: train.__getitems__(keys), number=1, repeat=5))
    return extra / 20 / 64 * 1e6, full / 64 * 1e6


def launch(*extra):
    """Run this file as one side in a fresh process: (its JSON line, launch time, exit time)."""
    launched = time.time()
    result = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
    ended = time.time()
    if result.returncode != 0:
        sys.exit(f"{extra[:2]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out.update(wall=ended - launched, startup=out["first_step"] - launched, exit=ended - out["fit_end"],
               samples_per_second=out["train_samples"] / out["fit_seconds"])
    return out, result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY.PATH=VALUE",
                   help="overrides for the template side, as train.py takes them (to measure a setting)")
    p.add_argument("--side", choices=["raw", "template"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--save-dir", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "raw":
        return side_raw(args.root, args.save_dir, args.epochs)
    if args.side == "template":
        return side_template(args.config, args.set)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        make_images(tmp / "images", args.images)
        print(f"{args.images} PNGs written in {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs, "
              f"{args.epochs} epochs per run, batch {BATCH}")
        seeding, sample = seeding_cost(tmp / "images")
        print(f"per-sample seeding: {seeding:.1f} us per sample, against {sample:.0f} us to decode and augment "
              f"one ({100 * seeding / sample:.2f}%)")
        ratios = {"samples_per_second": [], "wall": [], "startup": [], "exit": []}
        best = {"raw": {}, "template": {}}  # contention only ever slows a run: the best of each side is steadier
        for pair in range(args.pairs):
            runs = {}
            for side in (("raw", "template") if pair % 2 == 0 else ("template", "raw")):
                save_dir = tmp / f"{side}{pair}"
                save_dir.mkdir()
                if side == "raw":
                    runs[side], _ = launch("--side", "raw", "--root", str(tmp / "images"),
                                           "--save-dir", str(save_dir), "--epochs", str(args.epochs))
                else:
                    config = tmp / f"config{pair}.json"
                    config.write_text(json.dumps(template_config(tmp / "images", save_dir, args.epochs)))
                    runs[side], result = launch("--side", "template", "--config", str(config),
                                                *(["--set", *args.set] if args.set else []))
                    workers = [line for line in result.stdout.splitlines() if "worker" in line.lower()]
            r, t = runs["raw"], runs["template"]
            for side, run in runs.items():
                b = best[side]
                b.update(samples_per_second=max(b.get("samples_per_second", 0), run["samples_per_second"]),
                         wall=min(b.get("wall", 1e9), run["wall"]), startup=min(b.get("startup", 1e9), run["startup"]))
            ratios["samples_per_second"].append(t["samples_per_second"] / r["samples_per_second"])
            ratios["wall"].append(t["wall"] / r["wall"])
            ratios["startup"].append(t["startup"] - r["startup"])
            ratios["exit"].append(t["exit"] - r["exit"])
            print(f"pair {pair + 1}: samples/s raw {r['samples_per_second']:.0f} template {t['samples_per_second']:.0f} "
                  f"({ratios['samples_per_second'][-1]:.3f}x); wall raw {r['wall']:.2f} s template {t['wall']:.2f} s "
                  f"({ratios['wall'][-1]:.3f}x); start-up raw {r['startup']:.2f} s template {t['startup']:.2f} s; "
                  f"exit raw {r['exit']:.2f} s template {t['exit']:.2f} s; "
                  f"CPU ms per step, main process raw {1e3 * r['cpu'][0] / r['steps']:.1f} template "
                  f"{1e3 * t['cpu'][0] / t['steps']:.1f}, workers raw {1e3 * r['cpu'][1] / r['steps']:.1f} template "
                  f"{1e3 * t['cpu'][1] / t['steps']:.1f}; load {os.getloadavg()[0]:.2f}")
        print(f"template's worker line: {workers[0].strip() if workers else '(none logged)'}")
        for key, label, unit in (("samples_per_second", "throughput template/raw", "x"),
                                 ("wall", "wall time template/raw", "x"), ("startup", "start-up template-raw", " s"),
                                 ("exit", "after the fit, to exit: template-raw", " s")):
            v = ratios[key]
            line = f"{label}: median {statistics.median(v):.3f}{unit}, range {min(v):.3f}-{max(v):.3f}{unit}"
            if key in best["raw"]:
                r, t = best["raw"][key], best["template"][key]
                line += f"; best/best {t / r:.3f}x" if key != "startup" else f"; best-best {t - r:.3f} s"
            print(line)


if __name__ == "__main__":
    main()
