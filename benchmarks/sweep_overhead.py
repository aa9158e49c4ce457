"""The cost of sweep.py: a 10-trial grid sweep against a shell loop running the same 10 train.py commands.

    python benchmarks/sweep_overhead.py [--pairs 2] [--epochs 10]

Both sides train config.json with the same 10 learning rates (one process at a time, as a shell loop does),
in fresh save directories, alternately `--pairs` times:

  loop   bash: for lr in ...; do python train.py -c CONFIG --run-id lr-$lr optimizer.args.lr=$lr; done
  sweep  python sweep.py -c CONFIG optimizer.args.lr=lr1,...,lr10 (the study in SQLite, trials.csv kept current)

Wall time is launch to exit of the whole side. Printed per pair, then the median and range of sweep/loop.
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RATES = ["0.01", "0.005", "0.003", "0.002", "0.0015", "0.001", "0.0007", "0.0005", "0.0003", "0.0002"]


def timed(cmd, **kwargs):
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            config = json.loads((REPO / "config.json").read_text())
            config["trainer"].update(epochs=args.epochs, save_dir=f"{tmp}/loop{pair}")
            (Path(tmp) / f"loop{pair}.json").write_text(json.dumps(config))
            config["trainer"]["save_dir"] = f"{tmp}/sweep{pair}"
            (Path(tmp) / f"sweep{pair}.json").write_text(json.dumps(config))
            train = f"{shlex.quote(sys.executable)} train.py -c {tmp}/loop{pair}.json"
            loop = f"for lr in {' '.join(RATES)}; do {train} --run-id lr-$lr optimizer.args.lr=$lr || exit 1; done"
            sweep = [sys.executable, "sweep.py", "-c", f"{tmp}/sweep{pair}.json", "optimizer.args.lr=" + ",".join(RATES)]
            sides = [("loop", ["bash", "-c", loop]), ("sweep", sweep)]
            times = {name: timed(cmd) for name, cmd in (sides if pair % 2 == 0 else sides[::-1])}
            trials = (Path(tmp) / f"sweep{pair}" / "sweeps" / "grid" / "trials.csv").read_text().count("COMPLETE")
            assert trials == len(RATES), f"the sweep completed {trials} trials"
            ratios.append(times["sweep"] / times["loop"])
            print(f"pair {pair + 1}: loop {times['loop']:.1f} s, sweep {times['sweep']:.1f} s, "
                  f"sweep/loop {ratios[-1]:.3f}", flush=True)
    print(f"sweep/loop wall time over {len(ratios)} pair(s): median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
