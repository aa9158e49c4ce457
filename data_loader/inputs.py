"""How predict.py reads the inputs it is given: image files (and folders of them), and tables (.csv, .npy,
.pt) of a sample per row. Yours to change: a new input format is a branch in list_inputs(); the template
decodes images in the loader's workers and checks each input against the shape the model takes."""
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLES = {".csv", ".npy", ".pt"}
MAX_TABLE_BYTES = 2**30  # a table is read whole: larger ones are skipped (split them)
MAX_PIXELS = 100_000_000  # checked from an image's header, before it is decoded (PIL's own limit is 179M)


def is_number(field: str) -> bool:
    try:
        float(field)
        return True
    except ValueError:
        return False


def read_table(path, shape, dtype):
    """The samples of a .csv (a row each; a first line with a name that is not a number is a header, skipped),
    .npy or .pt file, as `dtype`."""
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise ValueError(f"larger than {MAX_TABLE_BYTES} bytes; split it into smaller files")
    with warnings.catch_warnings():  # numpy's and torch's warnings on odd files: the skip line says it
        warnings.simplefilter("ignore")
        if path.suffix.lower() == ".csv":
            text = path.read_text()
            header = not all(map(is_number, filter(None, text.partition("\n")[0].split(","))))
            data = torch.from_numpy(np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, skiprows=int(header)))
        elif path.suffix.lower() == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            try:  # never unpickle arbitrary objects from an input file
                data = torch.load(path, weights_only=True, map_location="cpu")
            except Exception:  # noqa: BLE001 - any unpickling failure
                raise ValueError("not a tensor file that torch.load(weights_only=True) reads") from None
    if not torch.is_tensor(data):
        raise ValueError(f"holds a {type(data).__name__}, not a tensor")
    if data.is_meta or data.untyped_storage().nbytes() < data.numel() * data.element_size():
        raise ValueError("its storage holds fewer values than its shape claims")  # e.g. stride 0, 10**6 rows
    if shape is not None and list(data.shape) == shape or data.dim() == 0:
        data = data[None]  # one sample
    if not len(data):
        raise ValueError("no samples in it")
    data = data.to(dtype if dtype is not None else torch.float32 if data.is_floating_point() else data.dtype)
    if shape is not None and data[0].numel() == int(np.prod(shape)):
        data = data.reshape(len(data), *shape)  # e.g. a flattened image per row
    return list(data)


def list_inputs(paths, shape, dtype, skip):
    """[(name, image path or tensor)]: image files (folders searched, in name order), rows of table files."""
    items = []
    for path in map(Path, paths):
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGES | TABLES) if path.is_dir() else [path]
        if not files:  # an empty folder
            skip(path, "no image, .csv, .npy or .pt file in this folder")
        for file in files:
            if not file.exists():
                skip(file, "not found")
            elif not file.is_file():  # a FIFO would block, a device (/dev/zero) never end
                skip(file, "not a regular file")
            elif file.suffix.lower() in IMAGES:
                items.append((str(file), file))  # decoded in the loader's workers
            elif file.suffix.lower() not in TABLES:
                skip(file, "not an image, .csv, .npy or .pt file")
            else:
                try:
                    items += [(f"{file}[{i}]", row) for i, row in enumerate(read_table(file, shape, dtype))]
                except Exception as e:  # noqa: BLE001 - whatever a file holds, it skips this file only
                    skip(file, f"unreadable: {' '.join(str(e).split())[:200] or type(e).__name__}")
    return items


class Inputs(Dataset):
    """(name, tensor or the reason it cannot be read) per input; images are opened as training's
    datasets open them (PIL; grayscale for a one-channel model) and given the eval transform."""

    def __init__(self, items, transform, mode):
        self.items, self.transform, self.mode = items, transform, mode

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, item = self.items[i]
        if torch.is_tensor(item):
            return name, item
        from PIL import Image
        from torchvision.transforms.v2 import functional as F
        try:
            with Image.open(item) as image:  # reads the header only
                if image.width * image.height > MAX_PIXELS:
                    return name, f"{image.width}x{image.height} pixels, more than {MAX_PIXELS} (MAX_PIXELS)"
                x = self.transform(image.convert(self.mode)) if self.transform else image.convert(self.mode)
            return name, F.to_dtype(F.to_image(x), torch.float32, scale=True) if not torch.is_tensor(x) else x
        except Exception as e:  # noqa: BLE001 - any decoding or transform failure skips this input only
            return name, f"unreadable: {' '.join(str(e).split())[:200] or type(e).__name__}"


