"""Runs you can compare: the config as hparams and text, scalars grouped by metric, read back with
TensorBoard's own reader and served by a real `tensorboard` process."""
import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import THREADS_ENV, Run, assert_ok, run_train, train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs of config.json that differ in their learning rate."""
    save_dir = tmp_path_factory.mktemp("tb") / "saved"
    return [train(save_dir, "trainer.epochs=2", "trainer.verbosity=0", f"optimizer.args.lr={lr}", run_id=run_id)
            for run_id, lr in (("slow", 0.001), ("fast", 0.004))]


def accumulator(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run.log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_the_config_is_logged_as_hparams_with_the_metrics_to_compare(two_runs):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    for run, lr in zip(two_runs, (0.001, 0.004)):
        content = accumulator(run).PluginTagToContent("hparams")
        start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["optimizer.args.lr"].number_value == lr
        assert start.hparams["arch.type"].string_value == "DigitsModel"
        assert start.hparams["data_loader.batch_size"].number_value == 32
        assert json.loads(start.hparams["metrics"].string_value) == ["accuracy", "top_k_acc"]
        experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert {m.name.tag for m in experiment.metric_infos} == {
            "loss/train", "accuracy/train", "top_k_acc/train", "loss/valid", "accuracy/valid", "top_k_acc/valid",
            "best/val_accuracy"}


def test_the_config_is_logged_as_text_and_the_scalars_are_grouped(two_runs):
    run = two_runs[0]
    acc = accumulator(run)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == json.loads((run.model_dir / "config.json").read_text())
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/valid", "loss/train_step", "accuracy/train", "accuracy/valid", "optimizer/lr",
            "time/epoch_seconds", "time/samples_per_second", "best/val_accuracy"} <= scalars
    best = [e.value for e in acc.Scalars("best/val_accuracy")]
    assert best == pytest.approx([max(float(r["val_accuracy"]) for r in run.metrics()[:i + 1]) for i in range(2)])
    assert "custom_scalars__config__" in acc.Tags()["tensors"]  # train and valid of a metric in one chart


def test_a_tensorboard_server_shows_the_runs_side_by_side(two_runs):
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(two_runs[0].save_dir / "log"),
                               "--port", "0", "--host", "127.0.0.1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=THREADS_ENV)
    try:
        deadline, address = time.monotonic() + 90, None
        for line in server.stdout:
            address = re.search(r"http://127\.0\.0\.1:\d+", line)
            if address or time.monotonic() > deadline:
                break
        assert address, "tensorboard did not start"
        base = address.group(0)
        with urllib.request.urlopen(f"{base}/data/plugins_listing", timeout=30) as response:
            plugins = json.load(response)
        for plugin in ("scalars", "images", "text", "hparams", "custom_scalars"):
            assert plugins[plugin]["enabled"], plugin
        query = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
                 "colParams": [], "startIndex": 0, "sliceSize": 10}
        request = urllib.request.Request(f"{base}/data/plugin/hparams/session_groups", method="POST",
                                         data=json.dumps(query).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            groups = json.load(response)["sessionGroups"]
        assert {g["name"]: g["hparams"]["optimizer.args.lr"] for g in groups} == {
            "Digits_CNN/slow": 0.001, "Digits_CNN/fast": 0.004}
        for group in groups:  # each run's latest values of the metrics, beside its config
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            assert {"loss/valid", "accuracy/valid", "best/val_accuracy"} <= set(values)
    finally:
        server.kill()
        server.wait()


def test_every_logged_step_reaches_tensorboard_with_the_loss_the_log_prints(tmp_path):
    """Per-step scalars go to TensorBoard's writer in batches: more steps than one batch, each with its value."""
    result = run_train("-c", "config.json", "--run-id", "steps", f"trainer.save_dir={tmp_path}", "trainer.epochs=2",
                       "trainer.log_step=1", "trainer.verbosity=2")
    assert_ok(result)
    # not a terminal: no bar, so a line per logged step
    printed = [float(v) for v in re.findall(r"^Train epoch \d+ \[\d+/\d+\] loss: (\S+)$", result.stdout, re.M)]
    logged = accumulator(Run(tmp_path, "steps")).Scalars("loss/train_step")
    assert len(printed) > 60  # several of the batches handed to the writer (10 each), and a partial one
    assert [e.step for e in logged] == list(range(1, len(printed) + 1))
    # printed with 6 decimals, stored as float32
    assert [e.value for e in logged] == pytest.approx(printed, abs=1e-6)


def test_in_a_terminal_the_bar_shows_the_loss_instead_of_a_line_per_step(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "train.py", "-c", "config.json", f"trainer.save_dir={tmp_path}",
                             "trainer.epochs=1", "trainer.log_step=1", "trainer.verbosity=2",
                             "trainer.tensorboard=false"], stdout=child, stderr=child, env=THREADS_ENV)
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.wait(timeout=300) == 0, output.decode(errors="replace")[-2000:]
    text = output.decode(errors="replace")
    assert re.search(r"Epoch 1 train .* loss=\d+\.\d{4}", text)  # the bar, with the running loss
    assert "Train epoch" not in text
    assert "val_accuracy" in text  # the epoch's summary lines still print
