"""Every config key the template reads: (default, allowed type(s), description), by section. ConfigParser fills in
the defaults and checks the types; the README's config reference mirrors these tables (tests/test_readme.py)."""
from utils.errors import REQUIRED

NoneType = type(None)
TOP_LEVEL = {
    "name": (REQUIRED, str, "experiment name; runs go to <save_dir>/models/<name>/<run_id>"),
    "seed": (0, int, "seeds python, numpy and torch; fixes the data split, the shuffling and the augmentation"),
    "n_gpu": (1, int, "GPUs to use (0 = CPU); falls back to the CPU when none is available"),
    "arch": (REQUIRED, dict, "the model: {type, args}"),
    "data_loader": (REQUIRED, dict, "the data and how it is batched; see the data_loader table"),
    "optimizer": (REQUIRED, dict, "{type: a torch.optim name, args}"),
    "loss": (REQUIRED, (str, dict), "a loss function's name, or {type, args} of a loss class"),
    "metrics": ([], list, "metric names (or {type, args, name}), computed over training and validation epochs"),
    "lr_scheduler": (None, (dict, NoneType), "{type: a torch.optim.lr_scheduler name, args, interval: "
                     "\"epoch\" or \"step\"}; null = constant learning rate"),
    "callbacks": ([], list, "[{type, args[, name]}, ...]: objects whose on_* methods the trainer calls"),
    "trainer": ({}, dict, "training loop settings; see the trainer table"),
}

LOADER_DEFAULTS = {
    "dataset": (REQUIRED, dict, "the data: {type: a Dataset class (yours, or torchvision.datasets.*), args}"),
    "valid_dataset": (None, (dict, NoneType), "validation data {type, args[, optional]}; null: validation_split"),
    "test_dataset": (None, (dict, NoneType), "test data {type, args[, optional]} for test.py; null: test_split"),
    "validation_split": (0.0, float, "fraction of dataset held out for validation (when valid_dataset is null)"),
    "test_split": (0.0, float, "fraction of dataset held out for test.py (when test_dataset is null)"),
    "batch_size": (32, int, "samples per batch (per process under torchrun)"),
    "shuffle": (True, bool, "shuffle the training data, in an order fixed by seed and epoch"),
    "num_workers": ("auto", (int, str), "DataLoader worker processes (0: none); \"auto\": see auto_workers()"),
    "prefetch_factor": (4, int, "batches each worker loads ahead (with num_workers > 0)"),
    "train_transform": ([], list, "[{type, args}, ...] applied in order to each training sample"),
    "eval_transform": ([], list, "[{type, args}, ...] applied in order to each validation and test sample"),
}

TRAINER_DEFAULTS = {
    "type": ("Trainer", str, "the Trainer class (a BaseTrainer subclass under trainer/) whose step() the run uses"),
    "epochs": (10, int, "epochs to train (>= 1)"),
    "save_dir": ("saved/", str, "root of the run outputs: <save_dir>/models and <save_dir>/log"),
    "save_period": (1, int, "keep checkpoint-epoch<N>.pth of every this many epochs; the last one is always kept"),
    "save_last": (True, bool, "also write every other epoch's checkpoint, each deleted when the next is written"),
    "verbosity": (2, int, "console log level of the template's loggers: 0 warnings, 1 info, 2 debug (per-step lines)"),
    "monitor": ("off", str, "'min METRIC', 'max METRIC' or 'off': picks model_best.pth, drives early stopping"),
    "early_stop": (0, int, "stop after this many consecutive epochs without improvement; 0 = never"),
    "tensorboard": (True, bool, "write TensorBoard event files into the run's log directory"),
    "log_step": (10, int, "every this many steps: log the loss, refresh the progress bar (a host sync)"),
    "len_epoch": (None, (int, NoneType), "optimizer steps per epoch (iteration-based); null = one pass over the data"),
    "save_every_steps": (0, int, "also write checkpoint-epoch<E>-step<S>.pth every this many steps; 0 = off"),
    "amp": (None, (str, NoneType), "mixed precision: 'bf16' (CPU or CUDA), 'fp16' (CUDA, scaled) or null = off"),
    "accumulate_steps": (1, int, "batches whose gradients are summed into one optimizer step"),
    "clip_grad_norm": (None, (float, NoneType), "clip the gradients' total norm to this value; null = no clipping"),
    "compile": (False, (bool, str), "wrap the model with torch.compile (true, or a torch.compile backend's name)"),
    "keep_last": (0, int, "keep only the newest this many checkpoint-epoch*.pth files; 0 = keep all"),
    "strategy": ("ddp", str, "under torchrun: 'ddp' (a copy of the model per process) or 'fsdp' (sharded, FSDP2)"),
    "fsdp_modules": (None, (list, NoneType), "fsdp: class names of the blocks to shard; null = the model's children"),
    "activation_checkpointing": (False, bool, "fsdp: recompute each block's activations in backward (less memory)"),
}
