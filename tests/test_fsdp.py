"""trainer.strategy "fsdp": FSDP2 sharding and DCP checkpoint folders, with real torchrun and gloo on the CPU."""
import json
import os
import pathlib
import shutil
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conftest import Run, assert_ok, assert_same, assert_user_error, call_main, read_json, run_script, run_train, \
    train, without_time
from test_distributed import FAST, preempt_as_a_scheduler, torchrun, training_into_epoch_2

FSDP = ["trainer.strategy=fsdp"]
STATE_KEYS = ("lr_scheduler", "scaler", "trainer", "metrics", "rng", "callbacks")


def full_state(folder, tmp_path):
    """{"model", "optimizer"} of checkpoint folder `folder`, gathered whole by DCP's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"full-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=True)


def assert_same_checkpoint(a, b, tmp_path):
    """Bitwise the same run state: the shards gathered whole, and state.pth's counters, RNG, scheduler and sums."""
    assert_same(full_state(a, tmp_path), full_state(b, tmp_path), f"{a.name}: shards")
    sa, sb = (torch.load(p / "state.pth", weights_only=True) for p in (a, b))
    for key in STATE_KEYS:
        assert_same(sa[key], sb[key], f"{a.name}: {key}")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 processes, fsdp, 2 epochs, a checkpoint folder after each."""
    save_dir = tmp_path_factory.mktemp("fsdp") / "saved"
    assert_ok(torchrun("-c", "config.json", "--run-id", "f", f"trainer.save_dir={save_dir}", "trainer.epochs=2",
                       "trainer.save_period=1", *FSDP, *FAST))
    return Run(save_dir, "f")


def test_an_fsdp_checkpoint_is_a_folder_of_each_process_shards(fsdp_run, tmp_path):
    assert fsdp_run.pth_files() == {"checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "model_best.pth"}
    folder = fsdp_run.model_dir / "checkpoint-epoch2.pth"
    assert {p.name for p in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pth"}
    assert [p.name for p in fsdp_run.model_dir.glob(".*")] == [".lock"]  # no temporary folder left
    state = torch.load(folder / "state.pth", weights_only=True)
    assert state["arch"] == "DigitsModel" and state["model"] == {} and len(state["rng"]) == 2
    model = full_state(folder, tmp_path)["model"]
    assert {k: tuple(v.shape) for k, v in model.items()}["fc1.weight"] == (128, 1024)  # whole again
    assert float(fsdp_run.metrics()[-1]["val_accuracy"]) > 0.8
    # model_best.pth is a folder of its own, its files hard links of the epoch's
    best = fsdp_run.model_dir / "model_best.pth"
    assert (best / "__0_0.distcp").stat().st_ino == (folder / "__0_0.distcp").stat().st_ino


def test_fsdp_resume_is_bitwise_at_an_epoch_boundary(fsdp_run, tmp_path):
    resumed = Run(tmp_path / "saved", "f")
    shutil.copytree(fsdp_run.save_dir, resumed.save_dir)
    shutil.rmtree(resumed.model_dir / "checkpoint-epoch2.pth")
    assert_ok(torchrun("-r", resumed.model_dir / "checkpoint-epoch1.pth"))
    assert_same_checkpoint(fsdp_run.model_dir / "checkpoint-epoch2.pth", resumed.model_dir / "checkpoint-epoch2.pth",
                           tmp_path)
    assert without_time(fsdp_run.metrics()) == without_time(resumed.metrics())


def test_fsdp_sigterm_to_every_process_saves_mid_epoch_and_resumes_bitwise(fsdp_run, tmp_path):
    save_dir = tmp_path / "saved"
    out = preempt_as_a_scheduler(*training_into_epoch_2(save_dir, "f", *FSDP))
    run = Run(save_dir, "f")
    marker = json.loads((run.model_dir / "preempted.json").read_text())
    middle = pathlib.Path(marker["checkpoint"])
    assert "-step" in middle.name and middle.is_dir(), out[-3000:]
    assert torch.load(middle / "state.pth", weights_only=True)["trainer"]["batches_done"] > 0
    assert_ok(torchrun("-r", middle, "trainer.epochs=2"))
    assert_same_checkpoint(fsdp_run.model_dir / "checkpoint-epoch2.pth", run.model_dir / "checkpoint-epoch2.pth",
                           tmp_path)
    assert without_time(fsdp_run.metrics()) == without_time(run.metrics())


def test_an_fsdp_checkpoint_resumes_on_one_process_and_back_on_two(fsdp_run, tmp_path):
    run = Run(tmp_path / "saved", "f")
    shutil.copytree(fsdp_run.save_dir, run.save_dir)
    result = run_train("-r", run.model_dir / "checkpoint-epoch2.pth", "trainer.epochs=3")  # DCP reshards
    assert_ok(result)
    assert "saved by 2 process(es), this run has 1" in result.stdout
    assert (run.model_dir / "checkpoint-epoch3.pth" / "__0_0.distcp").is_file()
    assert_ok(torchrun("-r", run.model_dir / "checkpoint-epoch3.pth", "trainer.epochs=4"))
    assert [r["epoch"] for r in run.metrics()] == ["1", "2", "3", "4"]
    assert float(run.metrics()[-1]["val_accuracy"]) > 0.8


def test_test_export_and_predict_take_an_fsdp_checkpoint_on_one_process(fsdp_run, tmp_path):
    from utils.run import load_run
    folder = fsdp_run.model_dir / "model_best.pth"
    loaded = load_run(folder, device=torch.device("cpu")).model.state_dict()
    assert_same(loaded, full_state(folder, tmp_path)["model"], "weights")
    run = Run(tmp_path / "saved", "f")
    shutil.copytree(fsdp_run.save_dir, run.save_dir)
    folder = run.model_dir / "model_best.pth"
    assert_ok(run_script("test.py", "-r", folder))
    assert read_json(run.model_dir / "test_metrics.json")["accuracy"] > 0.8
    assert_ok(run_script("export.py", "-r", folder, "--format", "torchscript"))
    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join(",".join(["0.5"] * 64) for _ in range(3)) + "\n")
    assert_ok(run_script("predict.py", "-r", folder, rows))  # written beside the folder, in the run directory
    assert_ok(run_script("predict.py", "-r", run.model_dir / "model.ts", rows, "-o", tmp_path / "ts.csv"))
    assert (run.model_dir / "predictions.csv").read_text() == (tmp_path / "ts.csv").read_text()
    assert not (folder / "predictions.csv").exists()


def test_a_plain_checkpoint_fine_tunes_an_fsdp_run_and_back(tmp_path):
    """Weights carry over both ways (lr 0 keeps them: bf16 computing leaves the fp32 parameters as they are)."""
    plain = train(tmp_path / "plain", "trainer.epochs=1", "trainer.tensorboard=false", "trainer.verbosity=1")
    source = torch.load(plain.model_dir / "checkpoint-epoch1.pth", weights_only=True)["model"]
    still = ["optimizer.args.lr=0", "lr_scheduler=null", "trainer.epochs=1", *FAST]
    assert_ok(torchrun("-c", "config.json", "-r", plain.model_dir / "checkpoint-epoch1.pth", "--run-id", "s",
                       f"trainer.save_dir={tmp_path / 'sharded'}", "trainer.amp=bf16", *FSDP, *still))
    sharded = Run(tmp_path / "sharded", "s").model_dir / "checkpoint-epoch1.pth"
    assert_same(full_state(sharded, tmp_path)["model"], source, "plain -> fsdp")
    assert_ok(torchrun("-c", "config.json", "-r", sharded, "--run-id", "b", f"trainer.save_dir={tmp_path / 'back'}",
                       *still))
    back = Run(tmp_path / "back", "b").checkpoint("checkpoint-epoch1.pth")["model"]
    assert_same(back, source, "fsdp -> ddp")


def test_chosen_blocks_and_activation_checkpointing_train_the_same_weights(fsdp_run, tmp_path):
    """Sharding Linear and Conv2d modules one by one, recomputing their activations: the same numbers as the default
    (the model's children), dropout included (checkpointing replays the RNG)."""
    assert_ok(torchrun("-c", "config.json", "--run-id", "f", f"trainer.save_dir={tmp_path / 'saved'}",
                       "trainer.epochs=1", *FSDP, *FAST, 'trainer.fsdp_modules=["Linear", "Conv2d"]',
                       "trainer.activation_checkpointing=true"))
    assert_same_checkpoint(fsdp_run.model_dir / "checkpoint-epoch1.pth",
                           Run(tmp_path / "saved", "f").model_dir / "checkpoint-epoch1.pth", tmp_path)


def _count_on_rank(rank, port, queue):
    """Bytes of parameters, gradients and Adam's state this process holds after a step, sharded and not."""
    from model.model import DigitsModel
    from utils.sharding import shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        counts = []
        for sharded in (False, True):
            torch.manual_seed(0)
            model = DigitsModel()
            if sharded:
                shard(model, {"fsdp_modules": None, "amp": None, "activation_checkpointing": False}, "cpu")
            optimizer = torch.optim.Adam(model.parameters())
            model(torch.randn(4, 1, 8, 8)).sum().backward()
            optimizer.step()
            tensors = [*model.parameters(), *(p.grad for p in model.parameters()),
                       *(t for s in optimizer.state.values() for t in s.values())]
            counts.append(sum(getattr(t, "_local_tensor", t).nbytes for t in tensors))
        queue.put((rank, counts))
    finally:
        tdist.destroy_process_group()


def test_each_process_holds_half_the_parameters_gradients_and_optimizer_state():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_count_on_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    counts = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    from model.model import DigitsModel
    n_params = sum(p.numel() for p in DigitsModel().parameters())  # every dim 0 of it is even: halves exactly
    steps = 8 * 4  # Adam's step counter per parameter tensor, a float32 scalar, not sharded
    for rank in (0, 1):
        whole, sharded = counts[rank]
        assert whole == 4 * 4 * n_params + steps  # parameters, gradients, exp_avg, exp_avg_sq in float32
        assert sharded == 4 * 4 * n_params // 2 + steps


def test_fsdp_config_faults_are_one_line(tmp_path):
    from utils.errors import ConfigError
    from utils.sharding import shard
    assert_user_error(run_train("-c", "config.json", "trainer.strategy=zero", "--dry-run"),
                      'trainer.strategy: must be "ddp" or "fsdp"')
    assert_user_error(run_train("-c", "config.json", "trainer.activation_checkpointing=true", "--dry-run"),
                      'trainer.activation_checkpointing: must be false unless trainer.strategy is "fsdp"')
    from model.model import DigitsModel
    with pytest.raises(ConfigError, match="trainer.fsdp_modules: the model has no module of class Block"):
        shard(DigitsModel(), {"fsdp_modules": ["Block"], "amp": None, "activation_checkpointing": False}, "cpu")
    ema = torchrun("-c", "config.json", *FSDP, 'callbacks=[{"type": "EMA"}]', "--dry-run", *FAST)
    assert ema.returncode != 0 and "Traceback" not in ema.stderr.split("error: ")[0]  # torchrun's own report aside
    assert ema.stderr.count('error: callbacks: EMA keeps a whole copy of the model, which trainer.strategy "fsdp" '
                            'cannot') == ema.stderr.count("error: ") == 2, ema.stderr[-3000:]  # a line per rank
    # a resumed run keeps its strategy: its checkpoints' format and the optimizer state's layout depend on it
    plain = train(tmp_path / "p", "trainer.epochs=1", "trainer.tensorboard=false", "trainer.verbosity=1")
    assert_user_error(run_train("-r", plain.model_dir / "checkpoint-epoch1.pth", "trainer.strategy=fsdp"),
                      "trainer.strategy: a resumed run keeps")


def test_a_save_killed_between_its_renames_loses_no_checkpoint(tmp_path, monkeypatch):
    """One process with fsdp writes the same folders. The kill comes when model_best.pth has been set aside and the
    new one is not in place yet: no name points at a partial folder, and the next start puts the old best back."""
    overrides = ["trainer.epochs=1", *FSDP, "trainer.tensorboard=false", "trainer.verbosity=1",
                 "trainer.monitor=min loss"]
    run = train(tmp_path / "saved", *overrides, run_id="k")
    real = pathlib.Path.rename

    def rename(self, target):
        if self.name == ".model_best.pth.tmp":
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
        return real(self, target)
    monkeypatch.setattr(pathlib.Path, "rename", rename)
    import train as train_script
    with pytest.raises(KeyboardInterrupt):
        call_main(train_script.main, ["-r", run.model_dir / "checkpoint-epoch1.pth", "trainer.epochs=2"])
    monkeypatch.undo()
    assert run.pth_files() == {"checkpoint-epoch1.pth", "checkpoint-epoch2.pth"}  # each complete
    assert {p.name for p in run.model_dir.glob(".*.tmp")} == {".model_best.pth.tmp", ".model_best.pth.old.tmp"}
    call_main(train_script.main, ["-r", run.model_dir / "checkpoint-epoch2.pth"])  # a finished run: starts, ends
    assert not list(run.model_dir.glob(".*.tmp"))
    assert torch.load(run.model_dir / "model_best.pth" / "state.pth", weights_only=True)["trainer"]["epoch"] == 1


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", ["code", "garbage"])
def test_a_planted_metadata_file_is_refused_and_runs_nothing(fsdp_run, tmp_path, planted):
    """DCP would unpickle .metadata with plain pickle: here only its own records load."""
    import pickle
    folder = tmp_path / "model_best.pth"
    shutil.copytree(fsdp_run.model_dir / "model_best.pth", folder)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)) if planted == "code" else pickle.dumps([1]))
    expected = "refused to load: it holds objects that could run code (unsupported GLOBAL posix.system" \
        if planted == "code" else "not a readable checkpoint"
    assert_user_error(run_script("test.py", "-r", folder), str(folder), expected)
    assert not marker.exists()


def test_rolling_and_kept_checkpoint_folders_follow_the_file_rules(tmp_path):
    """One process with fsdp writes folders too: save_period, save_last's rolling one and keep_last as for files."""
    quiet = [*FSDP, "trainer.tensorboard=false", "trainer.verbosity=1", "trainer.monitor=off"]
    run = train(tmp_path / "saved", "trainer.epochs=3", "trainer.save_period=2", *quiet)
    assert run.pth_files() == {"checkpoint-epoch2.pth", "checkpoint-epoch3.pth"}  # epoch 1's went with epoch 2's
    kept = train(tmp_path / "saved", "trainer.epochs=3", "trainer.keep_last=1", *quiet, run_id="k")
    assert kept.pth_files() == {"checkpoint-epoch3.pth"}
    assert [p.name for p in [*run.model_dir.glob(".*"), *kept.model_dir.glob(".*")]] == [".lock", ".lock"]
    assert (kept.model_dir / "checkpoint-epoch3.pth" / "state.pth").is_file()


def test_evaluation_on_padded_shards_counts_every_sample_once(tmp_path):
    """305 validation samples over 2 processes: one is padding. With lr 0 both runs validate the initial weights,
    rank 0's under fsdp: accuracy over the real samples only is the one-process figure exactly."""
    still = ["data_loader.validation_split=0.17", "optimizer.args.lr=0", "trainer.epochs=1", *FAST]
    assert_ok(torchrun("-c", "config.json", "--run-id", "v", f"trainer.save_dir={tmp_path / 'sharded'}", *FSDP,
                       *still))
    single = train(tmp_path / "single", *still, run_id="v")
    sharded, one = Run(tmp_path / "sharded", "v").metrics()[0], single.metrics()[0]
    for key in ("val_accuracy", "val_top_k_acc"):
        assert sharded[key] == one[key], key
    assert float(sharded["val_loss"]) == pytest.approx(float(one["val_loss"]), rel=0.02)  # a padded batch's mean


def test_a_checkpoint_from_before_the_strategy_keys_resumes(tmp_path):
    run = train(tmp_path / "saved", "trainer.epochs=1", "trainer.tensorboard=false", "trainer.verbosity=1")
    path = run.model_dir / "checkpoint-epoch1.pth"
    old = torch.load(path, weights_only=True)
    for key in ("strategy", "fsdp_modules", "activation_checkpointing"):
        del old["config"]["trainer"][key]
    torch.save(old, path)
    assert_ok(run_train("-r", path, "trainer.epochs=2"))
    assert [r["epoch"] for r in run.metrics()] == ["1", "2"]


def test_a_planted_metadata_file_is_refused_by_the_shard_loader_too(fsdp_run, tmp_path):
    """The resume path reads .metadata through DCP's reader, which the template replaces with the restricted one."""
    import pickle

    from model.model import DigitsModel
    from utils.sharding import load
    folder = tmp_path / "model_best.pth"
    shutil.copytree(fsdp_run.model_dir / "model_best.pth", folder)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    from utils.errors import CheckpointError
    with pytest.raises(CheckpointError, match="cannot load its shards .*unsupported GLOBAL posix.system"):
        load(folder, DigitsModel())
    assert not marker.exists()


def test_a_full_disk_while_writing_shards_is_one_line(tmp_path):
    from test_run_faults import assert_one_error_line, mounted
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", disk):  # the logs fit, a checkpoint's 1.8 MB do not
        result = run_train("-c", "config.json", "--run-id", "f", f"trainer.save_dir={disk}", *FSDP,
                           "trainer.verbosity=1")
        assert_one_error_line(result, 1, "cannot write the checkpoint's shards", "MiB free there",
                              "the checkpoints saved before are intact")
        assert not list((disk / "models" / "Digits_CNN" / "f").glob("*.pth"))  # no name for the partial folder
