"""A cache's root attributes, typed (`Header`): its identity (the parsed config and fingerprint), class names,
the dataset it came from (`Source`) and how it was extracted (`Extraction`). No h5py: the writer fills one from
an extraction, the reader from a file.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pipeline.cache.identity import FeatureConfig
from pipeline.errors import UserError
from pipeline.params import is_json_of


@dataclass(frozen=True)
class Extraction:
    """How the rows were last extracted (the root attribute `extraction`): recorded beside the config, not in it,
    since none of it changes the features beyond float rounding. Every field may be absent from an older file."""

    device: str | None = None
    precision: str | None = None  # fp32 | bf16 | fp16: predict embeds new images the same way by default
    decode: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    torch_threads: int | None = None
    processes: int | None = None
    weights_file: str | None = None  # the state-dict file the weights came from (None: imagenet or random)
    images: int | None = None  # went through the model in that run
    seconds: float | None = None
    images_per_s: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Extraction | None":
        """The attribute as read (None for an empty one): informational, so read leniently, a value of the wrong
        type as absent; the file's own dict is kept beside it (`Header.stored`) and written back as it was."""
        return _lenient(cls, d) if d else None


@dataclass(frozen=True)
class Source:
    """The dataset the rows came from (the root attribute `source`)."""

    root: str | None = None  # its folder, resolved; a manifest's paths are relative to it
    kind: str | None = None  # data.Dataset.kind
    name: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Source":
        return _lenient(cls, d)


def _lenient(cls, d: dict):
    """A dataclass of optional fields from a JSON object: unknown names ignored, a value of the wrong type None."""
    hints = typing.get_type_hints(cls)
    kinds = {f.name: typing.get_args(hints[f.name])[0] for f in fields(cls)}  # X of `X | None`
    return cls(**{name: d[name] if is_json_of(kind, d.get(name)) else None for name, kind in kinds.items()})


@dataclass(frozen=True)
class Header:
    """The root attributes: what a reader needs to trust and reuse the features.

    `config` is parsed and validated once, when the file is opened; a config this vggcache cannot read (a later
    version's, or an edited one) is None and `config_problem` says why, so that `info` still shows the file.
    """

    fingerprint: str
    config: FeatureConfig | None
    class_names: list[str]
    feature_dim: int
    source: Source = field(default_factory=Source)
    extraction: Extraction | None = None
    versions: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    config_problem: str = ""
    # the JSON attributes config, source and extraction as the file holds them (None: a header made in memory):
    # shown by info and written back unchanged when a cache is rewritten
    stored: dict | None = field(default=None, compare=False, repr=False)

    def feature_config(self, path: Path) -> FeatureConfig:
        """The config, or one UserError saying why this vggcache cannot use the cache at `path`."""
        if self.config is None:
            raise UserError(f"{path} holds features of an extractor config this vggcache cannot use ({self.config_problem})")
        return self.config

    @property
    def weights_file(self) -> str | None:
        """The state-dict file the features were made from, as the last extraction recorded it."""
        return self.extraction.weights_file if self.extraction else None

    @property
    def precision(self) -> str | None:
        """The autocast precision of the last extraction (fp32, bf16, fp16)."""
        return self.extraction.precision if self.extraction else None

    @property
    def config_dict(self) -> dict:
        """The config as the file holds it (what `info` shows, readable or not)."""
        return self.attribute("config")

    def attribute(self, name: str) -> dict:
        """A JSON attribute as the file holds it, or as this header's typed value writes it."""
        if self.stored is not None and name in self.stored:
            return self.stored[name]
        value = getattr(self, name)
        if name == "config":
            return value.to_dict() if value is not None else {}
        values = asdict(value) if value is not None else {}
        return dict(sorted((k, v) for k, v in values.items() if v is not None or name == "extraction"))
