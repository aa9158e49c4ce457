"""Export a checkpoint's model for production, then verify it: python export.py -r CHECKPOINT [--format F ...]

Formats: torchscript (model.ts, torch.jit.trace), exported (model.pt2, torch.export) and onnx (model.onnx),
each written beside the checkpoint with a dynamic batch dimension, with model.json describing the input.
Each artifact is loaded back and run on a real batch of the evaluation data next to the eager model; a
format that cannot export the model, or whose outputs differ by more than --tolerance, is reported in one
line and the other formats still go through (exit status 1 if any failed).
"""
import argparse
import contextlib
import inspect
import io
import os
import re
import sys
import warnings

import torch

from base.base_data_loader import make_datasets, make_loader
from utils import write_json
from utils.errors import DataError, run_main
from utils.run import file_sha256, load_exported, load_run

FORMATS = {"torchscript": "model.ts", "exported": "model.pt2", "onnx": "model.onnx"}


def export(fmt, model, example, path):
    """Write `model`, traced on `example`, to `path` in format `fmt`, with a dynamic batch dimension."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still widely loaded
            warnings.simplefilter("error", torch.jit.TracerWarning)  # e.g. data-dependent control flow: a wrong trace
            torch.jit.save(torch.jit.trace(model, example), str(path))
        return
    batch = torch.export.Dim("batch", min=1)
    dynamic = {next(iter(inspect.signature(model.forward).parameters)): {0: batch}}  # forward's input argument
    if fmt == "exported":
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic), str(path))
    else:  # one self-contained file (below protobuf's 2 GB limit)
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_shapes=dynamic, dynamo=True, verbose=False, external_data=False)


def reason_of(error) -> str:
    """The error's message, or that of the warning behind it (a TracerWarning turned into an error), cut short."""
    cause = error
    while cause is not None and not isinstance(cause, Warning):
        cause = cause.__cause__ or cause.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause or error))  # the ONNX exporter colours its messages
    return " ".join(text.split())[:300] or type(error).__name__


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint's model and verify the exported artifacts.")
    p.add_argument("-r", "--resume", required=True, help="checkpoint file, or a run directory (its newest)")
    p.add_argument("--format", nargs="+", choices=list(FORMATS), default=list(FORMATS), help="default: all")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |exported - eager| (1e-4)")
    p.add_argument("--weights", default="model", help="the weights to export: model (default), or a callback's (ema)")
    args = p.parse_args(argv)

    run = load_run(args.resume, weights=args.weights, device=torch.device("cpu"))
    config, path, model = run.config, run.path, run.model
    sets = make_datasets(config)  # one real batch of the evaluation data: test, else validation, else training split
    dataset = next((sets[k] for k in ("test", "valid", "train") if sets[k] is not None), None)
    batch = next(iter(make_loader(config, dataset)))
    if not (isinstance(batch, (tuple, list)) and torch.is_tensor(batch[0])):
        raise DataError(f"data_loader: export needs (inputs, targets) batches of tensors; this dataset gives "
                        f"{type(batch).__name__} batches")
    inputs = batch[0]
    with torch.no_grad():
        expected = model(inputs)
    results, failed, ready = {}, [], {}  # ready: {temp file: its final name}
    for fmt in args.format:
        out = path.parent / FORMATS[fmt]
        tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # renamed into place once complete: never a partial file
        try:
            # torch.export prints its partial graph and warnings to stderr on failure: the one line below says it
            with contextlib.redirect_stderr(io.StringIO()):
                export(fmt, model, inputs[:2], tmp)  # traced on 2 samples, checked on the whole batch
                loaded = load_exported(tmp)
            with torch.no_grad():
                diff = (loaded(inputs).float() - expected.float()).abs().max().item()
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported per format
            print(f"{fmt}: cannot export {type(model).__name__}: {reason_of(e)}")
            failed.append(fmt)
            tmp.unlink(missing_ok=True)
            continue
        ok = diff <= args.tolerance
        print(f"{fmt}: wrote {out}; max |exported - eager| on {len(inputs)} samples = {diff:.3g} "
              f"({'within' if ok else 'ABOVE'} the tolerance {args.tolerance:g})")
        results[fmt] = {"file": out.name, "sha256": file_sha256(tmp), "max_abs_diff": diff, "verified": ok}
        ready[tmp] = out
        failed += [] if ok else [fmt]
    # One set from one checkpoint. predict.py runs only a file whose checksum model.json lists, so at any instant
    # of a kill it runs the old set's files (until model.json is replaced) or the new set's, never a mix: the new
    # files move into place (each rename atomic; a moved one no longer matches the old model.json), model.json is
    # replaced in one rename, then the formats of an earlier export that this one did not write are deleted.
    for tmp, out in ready.items():
        os.replace(tmp, out)
    # the config is there so that predict.py on an artifact builds the same transforms
    write_json(dict(run_id=config.run_id, checkpoint=path.name, weights=args.weights, arch=run.checkpoint["arch"],
                    input={"shape": [None, *inputs.shape[1:]], "dtype": str(inputs.dtype)},
                    eval_transform=config["data_loader"]["eval_transform"],
                    class_names=run.checkpoint["data"]["class_names"],
                    tolerance=args.tolerance, formats=results, config=config.config), path.parent / "model.json")
    for stale in [path.parent / name for name in FORMATS.values() if path.parent / name not in ready.values()]:
        if stale.exists():
            stale.unlink()
            print(f"removed {stale} (an earlier export's)")
    if failed:
        print(f"error: not exported or not verified: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
