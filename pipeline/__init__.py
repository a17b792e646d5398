"""vggcache: run a frozen VGG16 body over an image folder once, then train fast heads on the cached features.

The Python API (pipeline/api.py): `open_cache`, `load_run`, `extract`, `train_head`, `preprocess`, `export_features`,
`similar`, loaded on first
use, so that `import pipeline` stays instant and imports no torch.
"""

__version__ = "0.1.0"
__all__ = ["open_cache", "load_run", "extract", "train_head", "preprocess", "export_features", "similar"]


def __getattr__(name: str):
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
