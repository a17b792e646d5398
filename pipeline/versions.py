"""The versions of the libraries that made a cache or a run, recorded beside them.
"""

from __future__ import annotations

from importlib.metadata import version


def library_versions() -> dict[str, str]:
    names = ("vggcache", "torch", "torchvision", "numpy", "h5py", "pillow", "scikit-learn")
    return {name: _version_or_none(name) for name in names}


def _version_or_none(name: str) -> str:
    try:
        return version(name)
    except Exception:  # not installed as a distribution (e.g. running from a source tree)
        return "unknown"
