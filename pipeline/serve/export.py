"""`pipeline export`: a run folder as one self-contained model file, ONNX or TorchScript.

The file maps a batch of images, uint8 RGB (N, 3, S, S) at the run's crop size S, to class probabilities (N, C):
the ImageNet normalisation, the frozen VGG16 body up to the cached layer (flip-averaged when the features were),
its pooling, the storage rounding of the cache (a head was trained on float16 rows: the exported model rounds as
`predict` does), the run's head-time pooling of a map, its feature normalisation and its head (block 5 + classifier
for a block5 run; a knn head carries its training rows). Resizing and cropping stay outside (they depend on the
image's size): `pipeline.preprocess` does them as extract does. Class names, the run's fingerprint and name are in
the file's metadata. Everything runs in float32 (the features' extraction precision, if bf16, is not reproduced).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline import files
from pipeline.backbone.weights import weights_spec
from pipeline.cache import pools
from pipeline.cache.identity import VGG16_CHANNELS
from pipeline.errors import UserError
from pipeline.runs.folder import Run, load_run

log = logging.getLogger(__name__)
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# an existing --out is replaced without --force only when it is such a file: ONNX (a protobuf whose first field is
# ir_version, tag 0x08) or TorchScript (a zip archive)
LOOKS_LIKE = {"onnx": lambda head: head[:1] == b"\x08", "torchscript": lambda head: head.startswith(b"PK\x03\x04")}
INPUT, OUTPUT = "images", "probabilities"
OPSET = 17


@dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    bytes: int
    classes: list[str]
    crop_size: int


def metadata(run: Run) -> dict[str, str]:
    """What the file says about itself (ONNX metadata_props; a TorchScript file's vggcache.json)."""
    fcfg = run.feature_config
    return {"vggcache.run": run.record.name, "vggcache.fingerprint": run.fingerprint,
            "vggcache.class_names": json.dumps(run.class_names), "vggcache.crop_size": str(fcfg.image_size),
            "vggcache.resize_size": str(fcfg.resize_size), "vggcache.input": f"{INPUT}: uint8 RGB (N, 3, S, S)",
            "vggcache.output": f"{OUTPUT}: float32 (N, {len(run.class_names)}), classes as class_names"}


def model(run: Run, weights: str | None = None):
    """The run as one torch module: uint8 images (N, 3, S, S) -> probabilities (N, C), float32, eval mode."""
    import torch

    from pipeline.backbone.torch_pools import exportable
    from pipeline.backbone.vgg16 import VGG16Body, vgg16_features

    fcfg = run.feature_config
    if fcfg.scales:
        raise UserError(f"run {run.folder.name} was trained on multi-scale features (--scales): they embed whole "
                        "images of several sizes, and an exported model takes one crop size; extract without --scales")
    body = VGG16Body(vgg16_features(weights_spec(fcfg.weights_id, run.record.features.weights_file, weights))
                     [:pools.LAYERS[fcfg.layer].end], fcfg.pool, fcfg.mean, fcfg.std, flip=fcfg.flip)
    head = run.load_head()
    body.pooling = exportable(fcfg.pool)  # the extraction's pooling, written so that ONNX can take it
    storage = torch.float16 if fcfg.dtype == "float16" else torch.float32
    to_all_classes = torch.zeros(len(head.classes_), len(run.class_names))
    to_all_classes[torch.arange(len(head.classes_)), torch.as_tensor(head.classes_)] = 1
    pool = exportable(run.record.pool) if run.record.pool else None

    class RunModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = body, head.as_module()
            self.register_buffer("to_all_classes", to_all_classes)

        def forward(self, images):
            # channels-last, as extract and predict run the body (the same convolution kernels, so the same rounding)
            images = images.contiguous(memory_format=torch.channels_last)
            rows = self.body(images).to(storage).float()  # as the cache stores rows, as predict rounds them
            if pool is not None:  # the run's head-time pooling of a map
                rows = pool(rows.reshape(rows.shape[0], VGG16_CHANNELS, fcfg.map_side, fcfg.map_side))
            return self.head(rows) @ self.to_all_classes  # 0 for a class the head never saw

    return RunModel().to(memory_format=torch.channels_last).eval().requires_grad_(False)


def export(run_folder: Path, fmt: str = "onnx", out: Path | None = None, weights: str | None = None,
           force: bool = False) -> Exported:
    """Write the run as one model file (default: beside the run folder, models/NAME.onnx or models/NAME.pt: a run
    folder holds what train-head wrote, nothing else)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not valid (expected one of {', '.join(FORMATS)})")
    run = load_run(run_folder)
    out = Path(out) if out else run.folder.parent / f"{run.folder.name}{FORMATS[fmt]}"
    files.ensure_writable_file(out, "--out", inputs=(run.folder,), output=files.Output(f"{fmt} model file",
                               LOOKS_LIKE[fmt]), force=force)
    module = model(run, weights)
    example = _example(run)
    (_onnx if fmt == "onnx" else _torchscript)(module, example, out, metadata(run))
    size = out.stat().st_size
    return Exported(out, fmt, size, run.class_names, run.feature_config.image_size)


def _example(run: Run):
    import torch

    side = run.feature_config.image_size
    return torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _onnx(module, example, out: Path, meta: dict) -> None:
    import torch

    try:
        import onnx
    except ImportError:
        raise UserError("--format onnx needs the onnx package: pip install -e '.[export]' (make install does)") from None

    tmp = Path(f"{out}.tmp")
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its successor
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET, dynamo=False)
    graph = onnx.load(str(tmp))
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(tmp))
    tmp.replace(out)


def _torchscript(module, example, out: Path, meta: dict) -> None:
    import torch

    tmp = Path(f"{out}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"vggcache.json": json.dumps(meta)})
    tmp.replace(out)
