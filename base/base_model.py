import contextlib
import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from utils.errors import ConfigError, DataError
from utils.util import weights_only_loads


class BaseModel(nn.Module):
    """An nn.Module whose str() ends with its number of trainable parameters."""

    def __str__(self):
        n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{super().__str__()}\nTrainable parameters: {n_params}"


def build_pretrained(build, builder, weights):
    """build() of the torchvision model `builder` with its pretrained `weights` (arch.args.weights), made safe:
    torch.hub unpickles the weights file with weights_only=False (a planted file would run code); here it is True.
    A download that fails (offline) names the file to place by hand, and leaves no directory behind."""
    from torchvision.models import get_model_weights
    try:
        url = get_model_weights(builder).verify(weights).url
    except (ValueError, KeyError, TypeError, AttributeError):  # no weights of that name: torchvision's error says so
        return build()
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    created = [d for d in file.parents if not d.exists()]  # deepest first
    try:
        with weights_only_loads():
            return build()
    except pickle.UnpicklingError as e:  # a pickle that needs code to load, or not a pickle at all
        raise DataError(f"{file}: refused: not a weights file that loads without running code "
                        f"({str(e).strip().splitlines()[0][:200]}); delete it") from None
    except OSError as e:  # urllib's URLError is one
        for d in created:  # torch.hub made them for the download
            with contextlib.suppress(OSError):
                d.rmdir()
        raise ConfigError(f"arch.args.weights: cannot download {url} ({str(e)[:200]}); offline, place that file "
                          f"at {file}") from None
