"""How many images a config generates, keeps and trains on: pure arithmetic, nothing loaded.

Shared by the plan (`raylab.cost`) and the paper preset's rules (`raylab.presets`), so that what a plan prints and
what a run is configured with come from one count.
"""
from __future__ import annotations

import math

from raylab.config import ExperimentConfig
from raylab.knobs import ConfigError
from raylab.data.datasets import get_dataset

# Wang et al. 2023 §3: "The original-to-generated ratio in each batch is 0.3 for 1M generated data; the ratio is set
# to 0.2 when the required generated data exceeds 1M" (App. B.1, Table 9: 0.2 beats 0.3 at 5M).
ONE_MILLION = 1_000_000
RATIO_UP_TO_1M, RATIO_ABOVE_1M = 0.3, 0.2


def generated_images(cfg: ExperimentConfig) -> int:
    """Images the generation samples: generate.per_class for each class (an unconditional set has the same
    budget, raylab.pipeline.plan.SeedPlan.from_config)."""
    return cfg.generate.per_class * get_dataset(cfg.data.dataset).num_classes


def selected_images(cfg: ExperimentConfig) -> int:
    """Images the selection policy keeps before `select.amount` (agreement: at most all of them). Top-k keeps
    ceil(top_fraction * per class) of every class (raylab.pipeline.select.top_fraction_per_class)."""
    n, classes = generated_images(cfg), get_dataset(cfg.data.dataset).num_classes
    if cfg.select.policy in ("topk", "pseudo"):
        return math.ceil(cfg.select.top_fraction * n / classes - 1e-9) * classes
    return n


def kept_images(cfg: ExperimentConfig) -> int:
    """Images the training draws its generated part from: the selection, cut to `select.amount` when set."""
    kept = selected_images(cfg)
    return min(kept, cfg.select.amount) if cfg.select.amount else kept


def check_amount(cfg: ExperimentConfig) -> None:
    """`select.amount` within what the selection keeps, refused before any sampling (the view build would fail
    only after the whole set is generated)."""
    if cfg.train.ratio < 1.0 and cfg.select.amount > selected_images(cfg):
        raise ConfigError(f"select.amount: {cfg.select.amount:,} is more than the {selected_images(cfg):,} images "
                          f"select.policy={cfg.select.policy} keeps of {generated_images(cfg):,} generated "
                          f"(generate.per_class={cfg.generate.per_class:,}); raise generate.per_class")


def paper_ratio(kept: int) -> float:
    """The original fraction of every batch for `kept` generated images (Wang et al. 2023 §3, App. B.1)."""
    return RATIO_UP_TO_1M if kept <= ONE_MILLION else RATIO_ABOVE_1M
