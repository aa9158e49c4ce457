"""Predict with a checkpoint or an exported model: python predict.py -r MODEL [INPUTS ...]

MODEL: a checkpoint (or a run directory: its newest), or model.ts / model.pt2 / model.onnx from export.py.
INPUTS: image files, or folders searched for them, transformed by the config's eval_transform; .csv files
(a sample per row), .npy / .pt files (a sample per index of the first dimension); none: the test split.
Writes predictions.csv beside MODEL (or -o FILE): input, predicted class, its probability and the top k (the
output's values for a model that is not a classifier), and the target on the test split. An input that
cannot be read or does not fit the model is reported in one line and skipped.
"""
import argparse
import collections
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from base.base_data_loader import auto_workers, fingerprint, make_datasets, make_loader, make_transform, source_of
from data_loader.inputs import Inputs, list_inputs
from logger import progress_bar
from utils.checkpoint import check_data
from utils.errors import ConfigError, DataError, run_main
from utils.run import ARTIFACTS, load_artifact, load_run
from utils.sharding import is_folder
from utils.util import atomic_write_text, to_device


def load_model(path, weights):
    """(config, device, function of a batch of inputs, step, what it takes) for a checkpoint or an artifact.
    step(batch) -> (loss, output, target): the run's own Trainer.step (so dict batches work), or for an
    artifact model(inputs) on (inputs, targets) batches, with no loss. What it takes: {input: {shape, dtype},
    class_names}, as the checkpoint recorded them (or model.json)."""
    if path.suffix not in ARTIFACTS:
        run = load_run(path, weights=weights)
        return run.config, run.device, run.model, run.trainer.step, run.checkpoint["data"]
    if weights != "model":
        raise ConfigError(f"--weights {weights[:80]}: an exported model holds the weights it was exported with")
    config, device, model, info = load_artifact(path)

    def step(batch):
        if not (isinstance(batch, (tuple, list)) and torch.is_tensor(batch[0])):
            raise DataError(f"data_loader: an exported model is run on (inputs, targets) batches; this dataset "
                            f"gives {type(batch).__name__} batches: predict with the checkpoint")
        return None, model(batch[0]), batch[1]
    return config, device, model, step, info


def check_output(out, sources):
    """ConfigError unless `out` can take predictions: a new file in an existing folder, or a predictions CSV
    (its header starts with `input,`) that is not one of `sources` (the model, the inputs)."""
    if not out.parent.is_dir() or out.exists() and not out.is_file():
        raise ConfigError(f"-o {out}: not a file in an existing folder")
    if out.exists():
        with open(out, "rb") as f:
            ours = f.read(6) == b"input,"
        if not ours or any(Path(s).exists() and out.samefile(s) for s in sources):
            raise ConfigError(f"-o {out}: exists and is not an earlier predictions CSV; left as it was "
                              "(name a new file)")


def model_input(info, source):
    """(the shape of one input, its dtype) that `info` (a checkpoint's data record, or model.json) describes,
    (None, None) where it describes none, and its class names; DataError naming `source` if it is malformed."""
    x, classes = info.get("input"), info.get("class_names")
    shape, dtype = (x.get("shape"), str(x.get("dtype"))) if isinstance(x, dict) else (None, None)
    dtype = getattr(torch, dtype.removeprefix("torch."), None) if dtype else None
    if x is not None and not (isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape[1:])
                              and isinstance(dtype, torch.dtype)):
        raise DataError(f"{source}: input must be {{shape: [null, sizes...], dtype: a torch dtype}}, or null")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{source}: class_names must be a list of strings, or null")
    return (shape[1:], dtype) if x is not None else (None, None), classes


def predict_files(config, run, device, paths, expected, batch_size, skip):
    """[(name, output, None)] for the inputs found under `paths`; `expected`: model_input()'s (shape, dtype)."""
    shape, dtype = expected
    cfg = config["data_loader"]
    transform, _ = make_transform(config, "eval_transform")  # an image is all of its sample here
    mode = "L" if shape is not None and len(shape) == 3 and shape[0] == 1 else "RGB"  # gray: a 1-channel model
    inputs = Inputs(list_inputs(paths, shape, dtype, skip), transform, mode)
    workers = auto_workers(inputs) if cfg["num_workers"] == "auto" else cfg["num_workers"]
    batch_size = batch_size or cfg["batch_size"]
    loader = DataLoader(inputs, batch_size=batch_size, collate_fn=list,  # (name, tensor or reason) pairs
                        num_workers=min(workers, len(inputs) // batch_size))  # none for a batch or two
    for batch in progress_bar(loader, desc="predict"):
        good = []
        for name, x in batch:
            if isinstance(x, str):
                skip(name, x)
            elif shape is not None and list(x.shape) != shape:
                skip(name, f"shape {list(x.shape)}, the model takes {shape}")
            elif x.is_floating_point() and not torch.isfinite(x).all():
                skip(name, "holds NaN or infinite values")
            else:
                shape = shape or list(x.shape)  # without the training data: the first input's
                good.append((name, x))
        if not good:
            continue
        try:
            outputs = run(torch.stack([x for _, x in good]).to(device))
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:  # where the input is unknown
            # (e.g. a model trained on dict batches, given a table)
            if expected[0] is not None:
                raise
            raise DataError(f"the model rejects inputs of shape {shape} (that of {good[0][0]}): "
                            f"{' '.join(str(e).split())[:200]}") from None
        yield from ((name, out, None) for (name, _), out in zip(good, outputs))


def predict_test_split(config, step, device, dataset):
    """[(name, output, target)] for the samples of the test split, through `step`. A sample is named by its
    file where the dataset lists them (ImageFolder's samples), else test[i]."""
    indices, source = source_of(dataset)
    names = iter([str(source.samples[i][0]) if hasattr(source, "samples") else f"test[{i}]" for i in indices])
    for batch in progress_bar(make_loader(config, dataset, device=device), desc="predict"):
        _, output, target = step(to_device(batch, device))
        yield from ((next(names), out, t) for out, t in zip(output, target))


def to_rows(results, classes, top_k):
    """A predictions.csv row per (name, output, target): for a classifier's scores (logits or log-probabilities
    alike) the softmax's top class, its probability and the top k; for other outputs, their values."""
    def label(i):
        return classes[i] if classes and 0 <= i < len(classes) else str(i)
    for name, output, target in results:
        output, row = output.detach().float().cpu(), {"input": name}
        if output.ndim == 1 and len(output) > 1:
            top = output.softmax(0).topk(min(top_k, len(output)))
            row.update(predicted=label(int(top.indices[0])), probability=f"{top.values[0]:.6f}",
                       top_k="; ".join(f"{label(int(i))}:{p:.4f}" for p, i in zip(top.values, top.indices)))
        else:
            row["output"] = json.dumps(output.tolist())
        if target is not None:
            is_label = target.numel() == 1 and "predicted" in row
            row["target"] = label(int(target)) if is_label else json.dumps(target.tolist())
        yield row


def main(argv=None):
    p = argparse.ArgumentParser(description="Predict with a checkpoint or an exported model.")
    p.add_argument("-r", "--resume", required=True, type=Path,
                   help="checkpoint file, run directory (its newest), or model.ts / model.pt2 / model.onnx")
    p.add_argument("inputs", nargs="*", help="image files or folders, .csv / .npy / .pt files; none: the test split")
    p.add_argument("-o", "--output", type=Path, help="the CSV to write (default: predictions.csv beside the model)")
    p.add_argument("--top-k", type=int, default=5, help="classes listed per input, most probable first (5)")
    p.add_argument("--batch-size", type=int, help="inputs per batch (default: the config's data_loader.batch_size)")
    p.add_argument("-d", "--device", help="GPU ids to use, e.g. 0 (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--weights", default="model", help="a checkpoint's weights: model (default), or a callback's (ema)")
    args = p.parse_args(argv)
    if args.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device
    if args.top_k < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ConfigError("--top-k and --batch-size: must be at least 1")

    start, skipped = time.perf_counter(), []
    beside = args.resume if args.resume.is_dir() and not is_folder(args.resume) else args.resume.parent  # a run dir
    out = args.output or beside / "predictions.csv"
    check_output(out, [args.resume, *args.inputs])
    config, device, run, step, info = load_model(args.resume, args.weights)
    artifact = args.resume.suffix in ARTIFACTS
    expected, classes = model_input(info, args.resume.with_name("model.json") if artifact else args.resume)

    def skip(name, reason):
        skipped.append(name)
        tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)
    test = make_datasets(config)["test"] if not args.inputs else None
    if args.inputs:
        results = predict_files(config, run, device, args.inputs, expected, args.batch_size, skip)
    elif test is None:
        raise ConfigError("data_loader: no test data (set data_loader.test_split or data_loader.test_dataset); "
                          "or name inputs to predict")
    else:
        if not artifact:  # as test.py: the test split must hold the samples it held when the checkpoint was saved
            check_data({"data": info}, args.resume, {"test": fingerprint(test)}, ["test"], "it may hold training "
                       "samples now; name the inputs to predict instead")
        results = predict_test_split(config, step, device, test)
    with torch.no_grad():
        rows = list(to_rows(results, classes, args.top_k))
    if not rows:
        raise DataError(f"no input could be predicted ({len(skipped)} skipped)")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), out)
    print(f"Predicted {len(rows)} input(s) in {time.perf_counter() - start:.1f} s, skipped {len(skipped)}; wrote {out}")
    if "predicted" in rows[0]:
        counts = collections.Counter(r["predicted"] for r in rows).most_common(5)
        print("Most predicted: " + ", ".join(f"{c} ({n})" for c, n in counts))
        if "target" in rows[0]:
            print(f"Accuracy against the targets: {np.mean([r['predicted'] == r['target'] for r in rows]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
