"""What a run costs before its first step and after its last: the template against a hand-written script.

    python benchmarks/fixed_cost.py [--pairs 8] [--workload digits|mlp|all] [--epochs 1]

Both sides run as fresh processes, alternately (raw, template, template, raw, ...), from this same checkout:
  raw       this file with --side raw: the script a user writes with torch alone. It reads the same data (the
            digits CSV; or 20,000 seeded random 32-feature rows, label = the largest of the first 10), splits it
            as the template does (70/15/15, or 90/10), builds the model after torch.manual_seed (DigitsModel, or
            torchvision.ops.MLP 32 -> 64 -> 10), Adam and StepLR, and per epoch trains (loss and accuracy
            summed on the device), validates, and torch.saves a checkpoint.
  template  `train.py -c <config>` as a user runs it, with the same data, model, optimizer and epochs, everything
            else at the template's defaults (TensorBoard, info.log, metrics.csv, atomic checkpoints, the input
            grid for digits); for mlp, a project made with new_project.py holding the rows in a Dataset file and
            torchvision.ops in its allowed_modules.txt. Only BaseTrainer._optimizer_step is wrapped with a clock.
Per run: start-up = launch to the end of the first optimizer step (imports, data, model, run directory, the
first batch); exit = the end of the last optimizer step to the process's exit (the last validation,
checkpoint, closing the logs, interpreter shutdown). Printed per pair, then medians and ranges of the
template's minus the raw script's seconds, with the load average.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS, FEATURES = 20_000, 32
FEATURES_FILE = '''import torch
from torch.utils.data import TensorDataset


class Features(TensorDataset):
    """Seeded random feature rows; the label is the largest of the first 10 features."""

    def __init__(self, rows=20000, features=32):
        x = torch.randn(rows, features, generator=torch.Generator().manual_seed(0))
        super().__init__(x, x[:, :10].argmax(1))
'''


def mlp_config(save_dir, epochs):
    config = json.loads((REPO / "config.json").read_text())
    config.update(name="Tabular_MLP", callbacks=[], loss="torch.nn.CrossEntropyLoss", metrics=["accuracy"],
                  arch={"type": "torchvision.ops.MLP", "args": {"in_channels": FEATURES, "hidden_channels": [64, 10]}})
    config["data_loader"] = {"dataset": {"type": "Features"}, "validation_split": 0.1, "batch_size": 32}
    config["trainer"].update(epochs=epochs, save_dir=str(save_dir))
    return config


def side_raw(workload, save_dir, epochs):
    """The hand-written script. Prints {"first_step", "last_step"} (time.time())."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    if workload == "digits":
        import gzip

        import numpy as np
        sys.path.insert(0, str(REPO))
        from model.model import DigitsModel
        with gzip.open(REPO / "data" / "digits.csv.gz", "rt") as f:
            table = torch.from_numpy(np.loadtxt(f, delimiter=",", dtype=np.float32))
        x, y, fractions = table[:, :64].reshape(-1, 1, 8, 8) / 16, table[:, 64].long(), (0.15, 0.15)
        seed, make, loss_fn = 1, DigitsModel, torch.nn.functional.nll_loss
    else:
        from torchvision.ops import MLP
        x = torch.randn(ROWS, FEATURES, generator=torch.Generator().manual_seed(0))
        y, fractions, seed = x[:, :10].argmax(1), (0.1, 0.0), 0
        make, loss_fn = (lambda: MLP(FEATURES, [64, 10])), torch.nn.functional.cross_entropy
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_valid, n_test = (round(len(x) * f) for f in fractions)
    valid, train = order[:n_valid], order[n_valid + n_test:]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True)
    valid_loader = DataLoader(TensorDataset(x[valid], y[valid]), batch_size=32)
    torch.manual_seed(seed)
    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    first = last = None
    for epoch in range(1, epochs + 1):
        model.train()
        sums = torch.zeros(2)
        for inputs, target in train_loader:
            optimizer.zero_grad()
            output = model(inputs)
            loss = loss_fn(output, target)
            loss.backward()
            optimizer.step()
            first, last = first or time.time(), time.time()
            sums += torch.stack([loss.detach() * len(target), (output.argmax(1) == target).sum()])
        model.eval()
        with torch.no_grad():
            correct = sum((model(i).argmax(1) == t).sum().item() for i, t in valid_loader)
        scheduler.step()
        print(f"epoch {epoch}: loss {sums[0].item() / len(train):.4f}, val_accuracy {correct / len(valid):.4f}")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                   Path(save_dir) / f"checkpoint-epoch{epoch}.pth")
    print(json.dumps({"first_step": first, "last_step": last}))


def side_template(project, config_path):
    """train.py's main, in `project`, with a clock on each optimizer step. Prints as side_raw does."""
    sys.path.insert(0, str(project))
    os.chdir(project)
    import base.base_trainer as bt
    import train
    clocks, step = {}, bt.BaseTrainer._optimizer_step

    def timed_step(self):
        step(self)
        clocks["last_step"] = time.time()
        clocks.setdefault("first_step", clocks["last_step"])
    bt.BaseTrainer._optimizer_step = timed_step
    try:
        train.run_main(train.main, ["-c", str(config_path), "--run-id", "run"])
    finally:  # run_main exits; the clocks are printed on the way out
        print(json.dumps(clocks))


def launch(*extra):
    """This file as one side, in a fresh process: {start-up, exit} seconds."""
    launched = time.time()
    result = subprocess.run([sys.executable, __file__, *map(str, extra)], capture_output=True, text=True)
    ended = time.time()
    if result.returncode != 0:
        sys.exit(f"{extra[:4]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    clocks = json.loads(result.stdout.strip().splitlines()[-1])
    return {"startup": clocks["first_step"] - launched, "exit": ended - clocks["last_step"]}


def measure(workload, pairs, epochs, tmp):
    project = REPO
    config = REPO / "config.json"
    if workload == "mlp":  # a project of the user's own, as the README's recipes make one
        project = tmp / "project"
        subprocess.run([sys.executable, REPO / "new_project.py", project], check=True, capture_output=True)
        (project / "data_loader" / "features.py").write_text(FEATURES_FILE)
        with open(project / "allowed_modules.txt", "a") as f:
            f.write("torchvision.ops\n")
        config = project / "mlp.json"
    diffs = {"startup": [], "exit": []}
    for pair in range(pairs):
        runs = {}
        for side in ("raw", "template") if pair % 2 == 0 else ("template", "raw"):
            save_dir = tmp / f"{workload}-{side}-{pair}"
            save_dir.mkdir()
            if side == "raw":
                runs[side] = launch("--side", "raw", "--workload", workload, "--save-dir", save_dir,
                                    "--epochs", epochs)
                continue
            settings = mlp_config(save_dir, epochs) if workload == "mlp" else \
                {"trainer": {"save_dir": str(save_dir), "epochs": epochs}}
            if workload == "mlp":
                config.write_text(json.dumps(settings))
                runs[side] = launch("--side", "template", "--project", project, "--config", config)
            else:  # config.json as shipped, its save_dir and epochs set on the command line's config copy
                copy = tmp / f"digits{pair}.json"
                shipped = json.loads(config.read_text())
                shipped["trainer"].update(settings["trainer"])
                copy.write_text(json.dumps(shipped))
                runs[side] = launch("--side", "template", "--project", project, "--config", copy)
        r, t = runs["raw"], runs["template"]
        for key in diffs:
            diffs[key].append(t[key] - r[key])
        print(f"{workload} pair {pair + 1}: start-up raw {r['startup']:.2f} s template {t['startup']:.2f} s; "
              f"exit raw {r['exit']:.2f} s template {t['exit']:.2f} s; load {os.getloadavg()[0]:.2f}")
    for key, label in (("startup", "launch to the first step"), ("exit", "the last step to exit")):
        v = diffs[key]
        print(f"{workload}: {label}, template - raw: median {statistics.median(v):+.3f} s, "
              f"range {min(v):+.3f} to {max(v):+.3f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--workload", choices=["digits", "mlp", "all"], default="all")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--side", choices=["raw", "template"], help=argparse.SUPPRESS)
    p.add_argument("--save-dir", help=argparse.SUPPRESS)
    p.add_argument("--project", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "raw":
        return side_raw(args.workload, args.save_dir, args.epochs)
    if args.side == "template":
        return side_template(args.project, args.config)
    print(f"{os.cpu_count()} CPUs; {args.epochs} epoch(s) per run; {args.pairs} pairs per workload")
    with tempfile.TemporaryDirectory() as tmp:
        for workload in ("digits", "mlp") if args.workload == "all" else (args.workload,):
            measure(workload, args.pairs, args.epochs, Path(tmp))
            shutil.rmtree(Path(tmp) / "project", ignore_errors=True)


if __name__ == "__main__":
    main()
