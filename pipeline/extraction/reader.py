"""Decode image files into model-ready uint8 tensors inside DataLoader workers (what may be decoded, and at what
cost: images.py); a bad file becomes a recorded error."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.cache.record import unreadable_reason, view_of
from pipeline.extraction.augment import view_params
from pipeline.extraction.distributed import quiet_resource_sharer
from pipeline.images import Refused, check_shape, open_image, opened, read_image_file, why_not_read


def preprocess(img: Image.Image, resize_size: int, crop_size: int) -> torch.Tensor:
    """torchvision's ImageClassification up to the dtype conversion: resize, centre crop, to a uint8 CHW tensor."""
    img = TF.resize(img, resize_size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(img, crop_size))


def describe_failure(e: Exception, n_bytes: int | None) -> str:
    """A short, deterministic reason a file was not read (images.why_not_read).

    `n_bytes` None: the file could not be read at all; `store.unreadable_reason` marks it so, which tells the
    next run to try it again (a permission or I/O problem can be fixed without changing the file). A file refused
    before reading (not a regular file, too large: images.read_image_file) is not retried until it changes.
    """
    if n_bytes is None:
        return str(e) if isinstance(e, Refused) else unreadable_reason(e)
    return why_not_read(e, n_bytes)


class ImageFiles(torch.utils.data.Dataset):
    """Files under `root`, decoded and preprocessed; never raises for a bad file, it reports it in `error`."""

    def __init__(self, root: Path, paths: list[str], resize_size: int, crop_size: int):
        self.root, self.paths = Path(root), list(paths)
        self.resize_size, self.crop_size = resize_size, crop_size

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        return read_image_file(self.root / self.paths[index])

    def empty(self):
        """What a file that could not be decoded stands for in its batch."""
        return torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8)

    def decode(self, data: bytes, index: int):
        """The model-ready image of file `index`, from its bytes."""
        return preprocess(open_image(data, self.resize_size), self.resize_size, self.crop_size)

    def __getitem__(self, index: int) -> dict:
        try:
            data = self.read(index)
        except Exception as e:  # any failure is this file's, not the run's: report it and go on
            return self.failed(index, e)
        return self.item(index, data)

    def item(self, index: int, data: bytes) -> dict:
        """The batch item of file `index` from its bytes (TarSamples gives them from a tar shard)."""
        image, error, digest = self.empty(), "", hashlib.sha256(data).hexdigest()
        try:
            image = self.decode(data, index)
        except Exception as e:
            error = describe_failure(e, len(data))
        return {"index": index, "image": image, "error": error, "sha256": digest}

    def failed(self, index: int, e: Exception) -> dict:
        """The batch item of file `index`, which could not be read."""
        return {"index": index, "image": self.empty(), "error": describe_failure(e, None), "sha256": ""}


class AugmentedImageFiles(ImageFiles):
    """ImageFiles whose paths may be views' keys (`store.view_key`): a view is its file's random resized crop and
    flip (augment.view_params), resized to the crop size; any other path is the usual centre crop."""

    def __init__(self, root: Path, paths: list[str], resize_size: int, crop_size: int, seed: int):
        super().__init__(root, paths, resize_size, crop_size)
        self.seed = seed

    def read(self, index: int) -> bytes:
        view = view_of(self.paths[index])
        return read_image_file(self.root / (view[0] if view else self.paths[index]))

    def decode(self, data: bytes, index: int):
        view = view_of(self.paths[index])
        if view is None:
            return super().decode(data, index)
        check_shape(*opened(data).size, self.resize_size)  # refused as its centre crop is: one policy for a file
        return augmented_view(open_image(data), self.seed, view[0], view[1], self.crop_size)


def augmented_view(img: Image.Image, seed: int, path: str, view: int, size: int) -> torch.Tensor:
    """View `view` of the (full resolution: a tight crop is upscaled) image at `path`, as a uint8 CHW tensor."""
    top, left, h, w, flip = view_params(seed, path, view, img.width, img.height)
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(TF.hflip(img) if flip else img)


MAX_ASPECT = 4  # multi-scale views: the longer side is at most this many times the scale
MIN_SIDE = 32  # VGG16's five 2x2 poolings need at least this many pixels a side


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """(short, long) sides of an image resized so its short side is `scale` and its long side at most MAX_ASPECT x
    `scale`, computed as torchvision's resize(max_size=...) does."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = scale, int(scale * long / short)
    if new_long > MAX_ASPECT * scale:
        new_short, new_long = int(MAX_ASPECT * scale * new_short / new_long), MAX_ASPECT * scale
    return new_short, new_long


def check_scaled(width: int, height: int, scale: int) -> None:
    """Refuse an image too long and thin for a scale: with its long side capped, its short side would be under
    MIN_SIDE (a 4000 x 100 panorama at scale 64 would be 256 x 6 px, which VGG16 cannot take)."""
    short, long = scaled_size(width, height, scale)
    if short < MIN_SIDE:
        raise Refused(f"{width}x{height} px: at scale {scale} (its long side capped at {long} px) its short side "
                      f"would be {short} px, under the {MIN_SIDE} px VGG16 needs")


class ScaledImageFiles(ImageFiles):
    """Multi-scale views (`extract --scales`): per file, the whole image (no crop) resized so its shorter side is each
    scale in turn, as uint8 tensors of differing shapes; batched with `collate_scaled`."""

    def __init__(self, root: Path, paths: list[str], scales: tuple[int, ...]):
        super().__init__(root, paths, max(scales), max(scales))
        self.scales = scales

    def empty(self):
        return []

    def decode(self, data: bytes, index: int):
        check_scaled(*opened(data).size, min(self.scales))  # the smallest scale makes the thinnest view
        img = open_image(data, max(self.scales), capped=True)  # a JPEG draft never below the largest scale
        # the longer side is capped at MAX_ASPECT x the scale: a 2 x 300 px strip must not become 64 x 9600
        return [TF.pil_to_tensor(TF.resize(img, s, interpolation=InterpolationMode.BILINEAR, antialias=True,
                                           max_size=MAX_ASPECT * s)) for s in self.scales]


class TarSamples(torch.utils.data.IterableDataset):
    """The items of `files` (an ImageFiles of image paths in tar shards, or of their views' keys) from their
    shards: each shard read once, from start to end, by one DataLoader worker (shard i by worker i mod workers),
    its wanted members decoded by `files` as they come. A shard that breaks mid-way has its images not yet read
    recorded as unreadable, so that the next run tries them again."""

    def __init__(self, files: ImageFiles, tars):
        self.files, self.tars = files, tars

    def _by_shard(self) -> dict[int, dict[str, list[int]]]:
        """shard -> member -> the indices of `files` it gives (an image and its views share their member)."""
        wanted: dict[int, dict[str, list[int]]] = {}
        for index, path in enumerate(self.files.paths):
            sample = self.tars.sample_of(path)
            wanted.setdefault(sample.shard, {}).setdefault(sample.member, []).append(index)
        return wanted

    def __iter__(self):
        from pipeline.extraction.tars import stream_members

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard, members in sorted(self._by_shard().items()):
            if shard % workers != worker:
                continue
            left = dict(members)
            try:
                for member, data in stream_members(self.tars.shards[shard], set(members)):
                    for index in left.pop(member):
                        yield self.files.failed(index, data) if isinstance(data, Exception) else self.files.item(index, data)
            except Exception as e:  # a shard cut or damaged mid-way: what is left of it is retried by the next run
                cause = e if isinstance(e, OSError) else OSError(f"{type(e).__name__} in its tar shard: {e}")
                for indices in left.values():
                    yield from (self.files.failed(index, cause) for index in indices)
                continue
            for member, indices in left.items():  # listed, but not in the shard any more: it changed since
                gone = OSError(f"not in tar shard {self.tars.shards[shard].name} any more")
                yield from (self.files.failed(index, gone) for index in indices)


def collate_scaled(items: list[dict]) -> dict:
    """Batch ScaledImageFiles items: images stay a list (one list of differently shaped views per file)."""
    return {"index": torch.tensor([it["index"] for it in items]), "image": [it["image"] for it in items],
            "error": [it["error"] for it in items], "sha256": [it["sha256"] for it in items]}


def decoded_images(batch: dict) -> tuple[list[int], torch.Tensor | list]:
    """Positions of the images of a batch that decoded, and those images (the whole, still pinned, batch if all did)."""
    ok = [k for k, e in enumerate(batch["error"]) if not e]
    if isinstance(batch["image"], list):  # multi-scale views
        return ok, [batch["image"][k] for k in ok]
    return ok, batch["image"] if len(ok) == len(batch["error"]) else batch["image"][ok]


def _lower_priority(worker_id: int) -> None:
    _ignore_sigterm()
    os.nice(10)


def make_loader(dataset: ImageFiles, batch_size: int, workers: int, pin_memory: bool,
                yield_to_model: bool = False, collate_fn=None) -> DataLoader:
    """Batches in dataset order; workers decode and resize so the main process only runs the model.

    `yield_to_model` (CPU runs): the forward owns the cores, and a niced decoder fills its gaps instead of
    preempting a convolution thread that the other threads then wait for (+2-4% measured on 2 cores).
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      worker_init_fn=_lower_priority if yield_to_model and workers else _ignore_sigterm,
                      collate_fn=collate_fn)


def batches_of(loader: DataLoader):
    """The loader's batches; its workers are shut down as soon as the iteration ends, however it ends (close() on
    an interruption), not later by a garbage collector that would print a dead worker's error as "Exception
    ignored" after the interruption line."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own clean-up of a multi-worker iterator
        if shutdown is not None:
            try:
                shutdown()
            except (RuntimeError, ConnectionError, EOFError):  # a worker already died: the caller says so
                pass


def _ignore_sigterm(worker_id: int = 0) -> None:
    """A decode worker leaves SIGTERM to the main process, which commits its batches and shuts the workers down
    itself (a SIGTERM to the whole process group would otherwise kill them first, and the main process would report
    a dead worker, with a traceback, instead of the interruption); a batch it was handing over when the main
    process stopped breaks a connection, without a traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.excepthook = quiet_resource_sharer(threading.excepthook)


# --- opt-in batched decoding on the GPU (`--decode gpu`): workers only read bytes and parse headers -------------

_EXIF_ORIENTATION = 0x0112


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a CHW tensor, as PIL's ImageOps.exif_transpose does to an image."""
    ops = {2: lambda x: x.flip(-1), 3: lambda x: x.flip(-2, -1), 4: lambda x: x.flip(-2),
           5: lambda x: x.transpose(-2, -1), 6: lambda x: torch.rot90(x, -1, (-2, -1)),
           7: lambda x: x.transpose(-2, -1).flip(-2, -1), 8: lambda x: torch.rot90(x, 1, (-2, -1))}
    return ops[orientation](image) if orientation in ops else image


class EncodedFiles(ImageFiles):
    """Baseline RGB/greyscale JPEGs come back as raw bytes for nvJPEG; anything else is decoded here on the CPU."""

    def failed(self, index: int, e: Exception) -> dict:
        return {"index": index, "raw": None, "orientation": 1, "image": None, "error": describe_failure(e, None),
                "sha256": ""}

    def item(self, index: int, data: bytes) -> dict:
        item = {"index": index, "raw": None, "orientation": 1, "image": None, "error": "",
                "sha256": hashlib.sha256(data).hexdigest()}
        try:
            header = opened(data)  # parses the header only: format, size, mode, EXIF
            check_shape(*header.size, self.resize_size)
            if header.format == "JPEG" and header.mode in ("RGB", "L"):
                item["raw"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                item["orientation"] = int(header.getexif().get(_EXIF_ORIENTATION, 1))
            else:
                item["image"] = preprocess(open_image(data, self.resize_size), self.resize_size, self.crop_size)
        except Exception as e:
            item["error"] = describe_failure(e, len(data))
        return item


def decode_on_device(items: list[dict], resize_size: int, crop_size: int, device) -> dict:
    """A batch from EncodedFiles -> the same dict ImageFiles batches give, images already on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [k for k, it in enumerate(items) if it["raw"] is not None]
    decoded = {}
    if raw:
        try:
            decoded = dict(zip(raw, decode_jpeg([items[k]["raw"] for k in raw], mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:  # one bad file fails the whole batched call: decode one by one to find it
            decoded = _decode_one_by_one(items, raw, device)
    resized = _resize_by_shape({k: orient(img, items[k]["orientation"]) for k, img in decoded.items()},
                               resize_size, crop_size)
    images, errors = [], [it["error"] for it in items]
    for k, it in enumerate(items):
        if k in resized:
            img = resized[k]
        elif it["image"] is not None:
            img = it["image"].to(device)
        else:
            errors[k] = errors[k] or "not decodable by nvJPEG"
            img = torch.zeros(3, crop_size, crop_size, dtype=torch.uint8, device=device)
        images.append(img)
    return {"index": torch.tensor([it["index"] for it in items]), "image": torch.stack(images), "error": errors,
            "sha256": [it["sha256"] for it in items]}


def _resize_by_shape(images: dict, resize_size: int, crop_size: int) -> dict:
    """Resize and crop images of one shape together: one kernel launch per shape, not per image."""
    by_shape: dict[tuple, list] = {}
    for k, img in images.items():
        by_shape.setdefault(tuple(img.shape), []).append(k)
    out = {}
    for keys in by_shape.values():
        batch = torch.stack([images[k] for k in keys])
        batch = TF.center_crop(TF.resize(batch, resize_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                               crop_size)
        out.update(zip(keys, batch))
    return out


def _decode_one_by_one(items: list[dict], raw: list[int], device) -> dict:
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = {}
    for k in raw:
        try:
            decoded[k] = decode_jpeg(items[k]["raw"], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            items[k]["error"] = f"RuntimeError: {e}".strip()[:300]
    return decoded


def make_encoded_loader(dataset: EncodedFiles, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=list,
                      prefetch_factor=4 if workers else None, worker_init_fn=_ignore_sigterm)
