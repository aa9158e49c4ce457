"""The loader's defaults: how many workers "auto" picks, pinning only for a CUDA device, and workers that
never keep a process from exiting."""
import subprocess
import sys
import textwrap

import torch
from torch.utils.data import Dataset, TensorDataset

from base import BaseDataLoader
from base.base_data_loader import auto_workers, make_loader
from conftest import ROOT, THREADS_ENV, parse_config


class Rows(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.full((3,), float(i)), i


def test_auto_workers_none_for_tensors_else_the_cpus_shared_by_the_local_processes(monkeypatch):
    import os
    cpus = len(os.sched_getaffinity(0))
    assert auto_workers(TensorDataset(torch.zeros(4, 2))) == 0
    assert auto_workers(Rows()) == max(1, min(8, cpus))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cpus))  # more processes than CPUs: still one each
    assert auto_workers(Rows()) == 1


def test_make_loader_takes_auto_and_an_explicit_number():
    config = parse_config()  # config.json: num_workers 0
    assert make_loader(config, Rows()).num_workers == 0
    auto = parse_config("data_loader.num_workers=auto", "data_loader.prefetch_factor=2")
    loader = make_loader(auto, Rows())
    assert loader.num_workers == auto_workers(Rows()) and loader._loader.prefetch_factor == 2
    assert [y.tolist() for _, y in loader] == [list(range(10))]  # batch_size 32: one batch, in order


def test_memory_is_pinned_only_for_a_cuda_device():
    for device in (None, "cpu", torch.device("cpu")):
        assert not BaseDataLoader(Rows(), 4, num_workers=1, device=device).pin_memory
    assert BaseDataLoader(TensorDataset(torch.zeros(4, 2)), 2, device="cpu").tensors[0].device.type == "cpu"


def test_a_loader_left_with_live_workers_does_not_hang_the_exit(tmp_path):
    """Workers ignore SIGTERM (a scheduler's signal is for the main process, which saves first); a loader
    kept alive until the interpreter exits must still let it exit."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from torch.utils.data import Dataset
        from base import BaseDataLoader

        class Rows(Dataset):
            def __len__(self):
                return 64

            def __getitem__(self, i):
                return torch.zeros(3), i

        LOADER = BaseDataLoader(Rows(), 4, num_workers=2)
        for epoch in range(2):  # its persistent workers wait for the next epoch
            LOADER.set_epoch(epoch)
            batches = list(LOADER)
        print("done")
    """))
    # before the fix: the exit waited forever on the workers
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30, env=THREADS_ENV)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
