"""Which head, and the hyperparameters the user fixed (`HeadConfig`, validated where it is built): the candidates
of its sweep. A run's recorded head parameters are checked with it when the run is loaded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pipeline.device import DEVICES
from pipeline.errors import UserError
from pipeline.heads.normalise import NORMS
from pipeline.heads.registry import HEADS
from pipeline.params import POSITIVE, Interval, OneOf, Optional, validate


@dataclass(frozen=True)
class HeadConfig:
    """Which head, and the hyperparameters fixed by the user (None: chosen by the sweep on validation)."""

    kind: str = "logreg"
    C: float | None = None
    k: int | None = None
    norm: str | None = None  # None: the head's default (HeadSpec.default_norm); "auto": swept with the rest
    hidden: int = 0
    dropout: float = 0.5
    lr: float | None = None
    weight_decay: float | None = None
    epochs: int | None = None  # None: the head's own default (HeadSpec.defaults)
    batch_size: int | None = None
    patience: int | None = None
    freeze_convs: int = 0  # block5: how many of conv5_1..conv5_3 stay frozen
    solver: str | None = None  # logreg: auto (default: chosen for the problem), newton, lbfgs, or sklearn (the reference)
    weights: str | None = None  # block5: the weights file, when the cache's has moved (checked by its hash)
    validation_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"

    PARAMS = {
        "kind": OneOf(tuple(HEADS)), "C": Optional(POSITIVE), "k": Optional(Interval(int, 1, 1 << 20)),
        "norm": Optional(OneOf(NORMS + ("auto",))), "hidden": Interval(int, 0, 1 << 16),
        "dropout": Interval(float, 0, 1, open_high=True), "lr": Optional(POSITIVE),
        "weight_decay": Optional(Interval(float, 0, None)), "epochs": Optional(Interval(int, 1, 100_000)),
        "batch_size": Optional(Interval(int, 1, 1 << 20)), "patience": Optional(Interval(int, 1, 100_000)),
        "freeze_convs": Interval(int, 0, 3), "solver": Optional(OneOf(("auto", "newton", "lbfgs", "sklearn", "torch"))),
        "validation_fraction": Interval(float, 0, 1, open_low=True, open_high=True),
        "seed": Interval(int, 0, 2**32 - 1), "device": OneOf(DEVICES),
    }
    OPTIONS = {"kind": "--head", "validation_fraction": "--early-stop-fraction"}
    SPECIFIC = ("C", "k", "lr", "weight_decay", "solver")  # each belongs to the heads whose grid or fixed has it

    def __post_init__(self):
        validate(self)
        spec = HEADS[self.kind]
        foreign = [name for name in self.SPECIFIC
                   if getattr(self, name) is not None and name not in spec.grid and name not in spec.fixed]
        if self.norm is not None and spec.default_norm is None:
            raise UserError(f"--norm does not apply to --head {self.kind}, which takes the maps as they are")
        if foreign:
            option = "--" + foreign[0].replace("_", "-")
            owners = ", ".join(h.name for h in HEADS.values() if foreign[0] in h.grid or foreign[0] in h.fixed)
            raise UserError(f"{option} applies to --head {owners}, not to --head {self.kind} (which sweeps "
                            f"{', '.join(spec.grid)})")

    @property
    def norms(self) -> tuple[str, ...]:
        """The normalisations tried: the one asked for, all of them for "auto", else the head's default."""
        if HEADS[self.kind].default_norm is None:
            return ()
        return NORMS if self.norm == "auto" else (self.norm or HEADS[self.kind].default_norm,)

    def candidates(self) -> list[dict]:
        """The constructor arguments of every head the sweep fits: every norm x the product of the grids, with each
        hyperparameter the user fixed taking that one value."""
        spec = HEADS[self.kind]
        axes = {name: [getattr(self, name)] if getattr(self, name) is not None else list(values)
                for name, values in spec.grid.items()}
        fixed = {name: getattr(self, name) if getattr(self, name) is not None else spec.defaults.get(name)
                 for name in spec.fixed}
        norms = [{"norm": norm} for norm in self.norms] or [{}]
        return [fixed | norm | dict(zip(axes, values)) for norm in norms for values in itertools.product(*axes.values())]
