"""Which weights a VGG16 body has, named so that two caches compare equal only when made with the same numbers:
`torchvision:<enum>`, `sha256:<hex of a local file>`, or `random:seed=0,torch=<version>`. No torch import: planning
an extraction names its weights without loading them.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import sha256_file

RANDOM_SEED = 0  # of `--weights none`: torchvision's VGG initialisation from this seed
IMAGENET_WEIGHTS = "VGG16_Weights.IMAGENET1K_V1"  # torchvision's enum, named here so that naming needs no torch


def weights_is_file(weights: str) -> bool:
    """A --weights spec that names a state-dict file (not imagenet or none)."""
    return weights not in ("imagenet", "none")


def weights_identity(weights: str) -> str:
    """Name the weights so that two caches compare equal only when they were made with the same numbers."""
    if weights == "imagenet":
        return f"torchvision:{IMAGENET_WEIGHTS}"
    if weights == "none":
        return f"random:seed={RANDOM_SEED},torch={version('torch')}"
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {weights!r} is not 'imagenet', 'none' or an existing state-dict file")
    st = path.stat()
    return f"sha256:{_weights_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}"


@functools.lru_cache(maxsize=8)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Planning and model building both ask for the identity: hash a weights file (~60 MB) once per process."""
    return sha256_file(Path(path))


def weights_spec(identity: str, weights_file: str | None, override: str | None = None) -> str:
    """The --weights value (imagenet | none | a file) that rebuilds weights named `identity`; the caller's model
    building then checks that the file has that very hash."""
    if identity.startswith("torchvision:"):
        return "imagenet"
    if identity.startswith("random:"):
        return "none"
    path = override or weights_file
    if not path or not Path(path).is_file():
        raise UserError(f"the features were made with the weights file {identity} (recorded at {path}); "
                        "pass it with --weights PATH")
    if weights_identity(path) != identity:
        raise UserError(f"--weights {path} is {weights_identity(path)}, but the features were made with {identity}")
    return path
