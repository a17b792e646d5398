"""How train-head reads a cache: one decision, made once from the config, the cache and the head's registry entry,
and recorded in run.json as it is (`LoadPlan`), instead of if-chains spread over the stage.

    pools            the head-time poolings to sweep (a map cache), or (None,): the rows as the cache holds them
    mode             memory: the splits are loaded; stream: read from the file as the head trains (cache/stream.py)
    views_per_image  K augmented views of each training image trained on beside it (0: none)
    refit            the choice fitted again on train + val before test is scored

each with the reason that decided it; a combination that cannot work is refused here, in one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.cache import pools as pooling
from pipeline.cache import stream
from pipeline.cache.identity import FeatureConfig
from pipeline.cache.store import Cache
from pipeline.errors import UserError
from pipeline.heads.registry import HEADS, HeadSpec
from pipeline.text import human_bytes
from pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)
MEMORY, STREAM = "memory", "stream"


@dataclass(frozen=True)
class LoadPlan:
    pools: tuple[str | None, ...]
    mode: str  # MEMORY | STREAM
    budget_bytes: int
    needed_bytes: int  # what the splits (and the views trained on) take in memory
    views_per_image: int = 0
    refit: bool = False
    reasons: dict[str, str] = field(default_factory=dict)  # pools, mode, views, refit -> why

    @property
    def streamed(self) -> bool:
        return self.mode == STREAM


def plan_loading(cfg: TrainConfig, cache: Cache) -> LoadPlan:
    """The loading plan of `cfg` on an open cache; refuses what cannot work (a head that needs memory when the
    splits are streamed, --refit or --views when streaming, a block5 head on a cache that is no pool4 map)."""
    spec, config = HEADS[cfg.head.kind], cache.header.feature_config(cfg.features)
    pools, pools_why = _pools(cfg, config, spec)
    cache.split_shape(cfg.train_split)  # a missing train split is the first thing to say after the pooling
    splits = [s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s in cache.splits]
    dim = max(cache.pooled_dim(p) for p in pools)
    needed = stream.in_memory_bytes(cache, splits, spec.memory_copies, dim)
    budget = cfg.budget_bytes or stream.default_budget()
    streamed, mode_why = _mode(cfg, spec, config, needed, budget, len(pools))
    refit, refit_why = _refit(cfg, streamed, cfg.test_split in cache.splits)
    k, views_bytes, views_why = _views(cfg, cache, spec, dim, streamed, needed, budget)
    reasons = {"pools": pools_why, "mode": mode_why, "views": views_why, "refit": refit_why}
    return LoadPlan(pools, STREAM if streamed else MEMORY, budget, needed + views_bytes, k, refit, reasons)


def _pools(cfg: TrainConfig, config: FeatureConfig, spec: HeadSpec) -> tuple[tuple[str | None, ...], str]:
    """The head-time poolings to sweep: every one of a map cache for --pool auto, the one asked for, or (None,)
    for a pooled cache (its rows are used as they are; --pool may only name what it holds)."""
    if spec.takes_map:
        if not config.feeds_block5:
            raise UserError(f"--head {cfg.head.kind} trains VGG16's block 5 on {pooling.BLOCK5_INPUT.name} maps, and "
                            f"{cfg.features} holds {config.layer} {config.pool} features: extract --layer "
                            f"{pooling.BLOCK5_INPUT.name} --pool map")
        if cfg.pool != "auto":
            raise UserError(f"--head {cfg.head.kind} takes the {pooling.BLOCK5_INPUT.name} map as it is: leave --pool out")
        return (None,), f"--head {cfg.head.kind} takes the map as it is"
    if config.is_map:
        if cfg.pool == "auto":
            return pooling.HEAD_POOLS, "--pool auto on a map cache: every head-time pooling, chosen on validation"
        return (cfg.pool,), f"--pool {cfg.pool} on a map cache"
    if cfg.pool not in ("auto", config.pool):
        raise UserError(f"{cfg.features} holds {config.pool}-pooled features, so --pool {cfg.pool} cannot be computed "
                        f"from it: use --pool {config.pool} (or auto), or extract a map cache (extract --pool map) to "
                        "choose at head time")
    return (None,), f"the cache holds {config.pool}-pooled rows"


def _mode(cfg: TrainConfig, spec: HeadSpec, config: FeatureConfig, needed: int, budget: int,
          n_pools: int) -> tuple[bool, str]:
    """(streamed, why): in memory when the splits fit the budget; streamed otherwise, or when asked (--stream)."""
    over = needed > budget
    why = "--stream was asked for" if cfg.stream else f"the splits need {human_bytes(needed)} in memory, " \
          f"{'over' if over else 'within'} the {human_bytes(budget)} budget (--memory-budget)"
    streamed = cfg.stream or over
    if streamed and not spec.streams:
        heads = [h.name for h in HEADS.values() if h.streams and (config.feeds_block5 or not h.takes_map)]
        other = "" if cfg.stream else ", or raise --memory-budget" + (" or choose one --pool" if n_pools > 1 else "")
        raise UserError(f"--head {cfg.head.kind} needs its data in memory and {why}: use --head {' or '.join(heads)}, "
                        f"which stream{'s' if len(heads) == 1 else ''} from the file{other}")
    return streamed, why


def _refit(cfg: TrainConfig, streamed: bool, has_test: bool) -> tuple[bool, str]:
    """(refit, why): as asked; by default when there is a test split and the splits are in memory."""
    if cfg.refit and streamed:
        raise UserError("--refit needs the splits in memory, and they are streamed from the file: use --no-refit, "
                        "or raise --memory-budget")
    if cfg.refit is not None:
        return cfg.refit, "--refit" if cfg.refit else "--no-refit"
    if not has_test:
        return False, f"no {cfg.test_split!r} split to score a refit head on"
    return (False, "the splits are streamed from the file") if streamed else (True, f"a {cfg.test_split!r} split")


def _views(cfg: TrainConfig, cache: Cache, spec: HeadSpec, dim: int, streamed: bool, needed: int,
           budget: int) -> tuple[int, int, str]:
    """(K views per image trained on, the bytes they add, why): the cache's augmented views, in memory only; asked
    for (--views) and impossible: refused; by default and over the budget or streamed: left out with a warning."""
    k = cache.views_per_row(cfg.train_split)
    if cfg.views is False:
        return 0, 0, "--no-views"
    if not k:
        if cfg.views:
            raise UserError(f"--views: {cfg.features} holds no augmented views of {cfg.train_split!r} "
                            "(extract --augment K makes them)")
        return 0, 0, "the cache holds no augmented views"
    extra = stream.views_bytes(cache, cfg.train_split, spec.memory_copies, dim)
    if streamed:
        why = "--stream was asked for" if cfg.stream else f"the rows are streamed from the file (over the " \
              f"{human_bytes(budget)} --memory-budget)"
        return _left_out(cfg, cache, why, "leave out --stream" if cfg.stream else "raise --memory-budget")
    if needed + extra > budget:  # the views go first: rows matter more
        return _left_out(cfg, cache, f"{human_bytes(needed + extra)} with the views, over the {human_bytes(budget)} "
                         "--memory-budget", "raise --memory-budget")
    return k, extra, f"{k} per image in the cache, within the memory budget"


def _left_out(cfg: TrainConfig, cache: Cache, why: str, fix: str) -> tuple[int, int, str]:
    """Views are trained on in memory only: refused when asked for (--views), else left out with a warning."""
    if cfg.views:
        raise UserError(f"--views trains on the augmented views in memory, and {why}: use --no-views, or {fix}")
    log.warning("%s holds augmented views, left out of training: %s", cache.path, why)
    return 0, 0, f"left out: {why}"
