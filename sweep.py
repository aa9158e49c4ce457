"""Many runs of one config, searched with Optuna: python sweep.py -c config.json -s configs/space.yaml [--trials N]
or a grid from the command line: python sweep.py -c config.json optimizer.args.lr=0.1,0.01 seed=1,2,3

Each trial is a run of train.py (under torchrun with --nproc) in <save_dir>/sweeps/<name>/models/<name>/trial-<N>;
the study is in <save_dir>/sweeps/<name>/study.db (or --storage), the table of trials in trials.csv beside it."""
import argparse
import csv
import ctypes
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import torch
from optuna.trial import TrialState

from sweeps.report import open_storage, trial_id
from sweeps.space import Space, from_shortcut, load_space
from utils.errors import ConfigError, TrainingError, run_main
from utils.util import atomic_write_text, lock_dir

TRAIN = str(Path(__file__).resolve().parent / "train.py")  # each trial is a run of it
REPORT = "sweeps.report.ReportToStudy"  # the callback reporting to the study (allowed_modules.txt lists the module)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run many trainings of one config: a search on Optuna.")
    p.add_argument("-c", "--config", required=True, help="the config every trial starts from")
    p.add_argument("-s", "--space", help="SPACE file (.json, .yaml): parameters, sampler, trials, objective, pruner")
    p.add_argument("--trials", type=int, help="number of trials (default: SPACE's trials; a grid: all its points)")
    p.add_argument("--workers", type=int, default=1, help="trials run at once by this command (default 1)")
    p.add_argument("--storage", help="an Optuna RDB URL shared by several commands (default: SQLite in the sweep)")
    p.add_argument("--name", help="the sweep's name (default: the SPACE file's name, else 'grid')")
    p.add_argument("--repeat", type=int, default=1, help="run each parameter set with seeds seed, seed+1, ...")
    p.add_argument("--nproc", type=int, default=0, help="run each trial under torchrun with this many processes")
    p.add_argument("grid", nargs="*", metavar="KEY.PATH=V1,V2", help="a grid over these values (instead of -s)")
    args = p.parse_intermixed_args(argv)
    if bool(args.space) == bool(args.grid) or min(args.workers, args.repeat, args.trials or 1, args.nproc + 1) < 1:
        p.error("give a SPACE file with -s or KEY.PATH=V1,V2,... (a grid); --workers, --repeat, --trials at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    space = Space(load_space(args.space) if args.space else from_shortcut(args.grid), args.config)
    if args.repeat > 1 and "seed" in space.suggesters:
        raise ConfigError("seed: --repeat sets the seeds (seed, seed+1, ...); leave seed out of the space")
    trials = args.trials or space.space.get("trials") or space.size
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError("trials: give the number of trials (--trials N, or \"trials\" in SPACE)")
    name = Path(args.name or (Path(args.space).stem if args.space else "grid")).name  # a name, not a path
    return Sweep(args, space, name, min(trials, space.size or trials)).run()


class Sweep:
    def __init__(self, args, space, name, n_trials):
        self.args, self.space, self.name, self.n, self.running, self.stopping = args, space, name, n_trials, [], None
        self.dir = Path(space.base["trainer"]["save_dir"]) / "sweeps" / name
        self.url = args.storage or f"sqlite:///{self.dir / 'study.db'}"
        (self.dir / "output").mkdir(parents=True, exist_ok=True)
        if not (self.dir / "id").exists():  # this sweep directory's id, recorded in each trial it runs
            atomic_write_text(os.urandom(16).hex(), self.dir / "id")
        self.id, self.storage = (self.dir / "id").read_text(), open_storage(self.url)
        self.study = optuna.create_study(storage=self.storage, study_name=name, sampler=space.sampler,
                                         direction=f"{space.mode}imize", load_if_exists=True)  # max: maximize
        definition = json.dumps([space.space["parameters"], space.space.get("sampler"), space.objective, args.repeat])
        if self.study.user_attrs.setdefault("definition", definition) != definition:
            raise ConfigError(f"--name {name}: this sweep was started with another space, objective or --repeat")
        self.study.set_user_attr("definition", definition)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
        self.gpus, self.per_trial = visible.split(",") if torch.cuda.is_available() else [], max(args.nproc, 1)
        self.workers = min(args.workers, len(self.gpus) // self.per_trial) if self.gpus else args.workers
        self.threads = max(1, len(os.sched_getaffinity(0)) // (self.workers * self.per_trial))

    def run(self):
        signal.signal(signal.SIGTERM, self._signal)  # Ctrl-C (SIGINT) reaches the trials itself, and ends the sweep
        while self.running or not (self.stopping or self._done()):
            self._reap()
            while not self.stopping and len(self.running) < self.workers and self._next_trial():
                self._write_table()
            time.sleep(0.05)
        self._write_table()
        if self.stopping:
            print(f"Stopped by {signal.Signals(self.stopping).name}: the same command continues", file=sys.stderr)
            sys.exit(128 + self.stopping)
        return self._summary()

    def _signal(self, signum, frame):  # SIGTERM: the trials save their place and stop, the sweep with them
        if self.stopping is None:
            for job in self.running:
                job.proc.send_signal(signal.SIGTERM)
        self.stopping = signum

    def _counted(self):  # every trial of the study but those dropped as one too many
        return [t for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("void")]

    def _ours(self, t):  # a running trial this directory resumes, once no process holds its lock
        # a trial whose start was cut short (no sweep directory recorded) is anyone's after a minute
        cut_short = t.datetime_start and time.time() - t.datetime_start.timestamp() > 60
        return t.state == TrialState.RUNNING and t.user_attrs.get("dir", self.id if cut_short else 0) == self.id

    def _done(self):
        return len(self._counted()) >= self.n and not any(map(self._ours, self._counted()))

    def _lock(self, number):
        """An open file locking trial `number` (its processes inherit it), or None if another process has it."""
        (self.dir / "locks" / str(number)).mkdir(parents=True, exist_ok=True)
        return lock_dir(self.dir / "locks" / str(number))[0]

    def _next_trial(self) -> bool:
        """Start a trial: one a stopped sweep left running here, else a new one; False if none is due."""
        trials = self._counted()
        for t in filter(self._ours, trials):
            lock = self._lock(t.number)
            if lock is not None:
                return self._start(optuna.trial.Trial(self.study, trial_id(self.storage, self.name, t.number)), lock)
        if len(trials) >= self.n:
            return False
        trial = self.study.ask()
        lock = self._lock(trial.number)
        if sum(t.number < trial.number for t in self._counted()) >= self.n:  # another command asked at once
            trial.set_user_attr("void", True)
            self.study.tell(trial, state=TrialState.FAIL)
            return lock.close()
        return self._start(trial, lock)

    def _start(self, trial, lock):
        """Run `trial` here; a job is its runs (one per seed, one after another), the lock its processes hold too."""
        seed, gpus, self.gpus = self.space.base["seed"], self.gpus[:self.per_trial], self.gpus[self.per_trial:]
        runs = [f"trial-{trial.number}" + f"-seed{seed + k}" * (self.args.repeat > 1) for k in range(self.args.repeat)]
        trial.set_user_attr("dir", self.id)
        trial.set_user_attr("runs", [str(self.dir / "models" / self.space.base["name"] / run) for run in runs])
        self.running.append(SimpleNamespace(trial=trial, lock=lock, params=self.space.suggest(trial), runs=runs,
                                            gpus=gpus, codes=[]))
        self._launch(self.running[-1])
        return True

    def _launch(self, job):
        """Start the job's next run: `train.py -c CONFIG --run-id RUN --auto-resume` with the trial's values."""
        k = len(job.codes)
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.args.nproc}"]
        cmd = [sys.executable, *torchrun * bool(self.args.nproc), TRAIN, "-c", self.args.config, "--auto-resume",
               "--run-id", job.runs[k], f"trainer.save_dir={self.dir}"]
        if self.space.pruner != "none" and k == 0:  # the first seed's run reports each epoch to the study
            report = dict(storage=self.url, study=self.name, trial=job.trial.number, objective=self.space.objective,
                          pruner=self.space.pruner)
            cmd.append("callbacks=" + json.dumps([*self.space.base["callbacks"], {"type": REPORT, "args": report}]))
        cmd += [f"{key}={json.dumps(value)}" for key, value in job.params.items()]
        cmd += [f"seed={self.space.base['seed'] + k}"] * (self.args.repeat > 1)
        env = {"OMP_NUM_THREADS": str(self.threads), **os.environ, **{"CUDA_VISIBLE_DEVICES": ",".join(job.gpus)}}
        # Linux: the trial gets SIGTERM (it saves its position and stops) when the sweep dies, even by SIGKILL
        preexec = (lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM)) if sys.platform == "linux" else None  # DEATHSIG
        with open(self.dir / "output" / f"{job.runs[k]}.log", "a") as log:
            job.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        pass_fds=(job.lock.fileno(),), preexec_fn=preexec)

    def _reap(self):
        for job in [j for j in self.running if j.proc.poll() is not None]:
            job.codes.append(job.proc.returncode)
            finished = job.codes[-1] != 0 or len(job.codes) == len(job.runs)
            if not finished and not self.stopping:
                self._launch(job)
                continue
            self.running.remove(job)
            if not self.stopping or job.codes[-1] == 0 and finished:
                self._finish(job)  # else it stays running in the study: the same command resumes it
            job.lock.close()
            self.gpus += job.gpus
            self._write_table()

    def _finish(self, job):
        """Tell the study how the trial ended: the mean objective of its runs, or pruned, or failed with its error."""
        try:
            values = [self._objective(run) for run in job.runs] if job.codes[-1] == 0 else None
            if values:
                job.trial.set_user_attr("spread", statistics.stdev(values) if len(values) > 1 else 0.0)
                return self.study.tell(job.trial, statistics.mean(values))
            lines = (self.dir / "output" / f"{job.runs[len(job.codes) - 1]}.log").read_text().splitlines()
            errors = [line[7:] for line in lines if line.startswith("error: ")] or [s for s in lines if s.strip()]
            error = f"{(errors or [''])[-1][:300]} (exit status {job.codes[-1]})"
        except (OSError, ValueError) as e:  # no metrics.csv, or no objective in it
            error = f"the objective {self.space.metric}: {e}"
        job.trial.set_user_attr("error", error)
        pruned = error.startswith("pruned by the sweep")  # the one-line error of ReportToStudy (sweeps/report.py)
        self.study.tell(job.trial, state=TrialState.PRUNED if pruned else TrialState.FAIL)

    def _objective(self, run):
        """The best value of the objective over the run's epochs, in its metrics.csv."""
        with open(self.dir / "log" / self.space.base["name"] / run / "metrics.csv", newline="") as f:
            values = [float(row[self.space.metric]) for row in csv.DictReader(f) if row.get(self.space.metric)]
        return (max if self.space.mode == "max" else min)(values)  # none: a ValueError

    def _write_table(self):
        """trials.csv in the sweep directory: every trial of the study, as it stands now."""
        keys = list(self.space.suggesters)
        rows = [["number", "state", "objective", "spread", *keys, "runs", "error"]]
        for t in self._counted():
            value, attrs = t.value if t.state == TrialState.COMPLETE else "", t.user_attrs
            rows.append([t.number, t.state.name, value, attrs.get("spread", ""), *(t.params.get(k, "") for k in keys),
                         " ".join(attrs.get("runs", [])), attrs.get("error", "")])
        with open(self.dir / "trials.csv.tmp", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
        os.replace(self.dir / "trials.csv.tmp", self.dir / "trials.csv")  # a reader never sees half a table

    def _summary(self):
        try:
            best = self.study.best_trial
        except ValueError:
            raise TrainingError(f"no trial completed; see {self.dir / 'trials.csv'}") from None
        repeat, runs = self.args.repeat, " ".join(best.user_attrs["runs"])
        spread = f" (mean of {repeat} seeds, spread {best.user_attrs['spread']:.3g})" if repeat > 1 else ""
        print(f"Best trial {best.number}: {self.space.metric} {best.value:.6g}{spread}; {runs}")
        values = [f"{key}={json.dumps(value)}" for key, value in best.params.items()] + ["seed=SEED"] * (repeat > 1)
        print("Reproduce it: " + shlex.join(["python", "train.py", "-c", self.args.config, *values]))


if __name__ == "__main__":
    run_main(main)
