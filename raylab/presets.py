"""The named presets every verb and experiment script takes (`--preset tiny|smoke|paper`).

`paper` is the config's dataclass defaults on CIFAR-10 (Wang et al. 2023) laid out for a GPU cluster; `tiny` runs
every stage on 2 CPU cores on the embedded digits; `smoke` shrinks `tiny` further for CI. A preset is a flat
`{"section.key": value}` table. `make_config` layers, lowest first: the preset, an experiment's defaults (its paper
table's settings), the dataset's own values (`DATASET_PRESETS`), the preset's rules (`PRESET_RULES`, for keys nobody
set), and the user's `--set` overrides. Verbs and experiments share every layer but the experiment's defaults, so
`raylab train --preset paper` and `ablate_beta.py --preset paper` agree on every key the ablation does not set.
"""
from __future__ import annotations

import math
import typing
from dataclasses import fields
from typing import Any, Callable, Mapping

from raylab.amounts import check_amount, kept_images, paper_ratio
from raylab.config import MODELS, STAGES, DataConfig, ExperimentConfig, from_flat, override, split_key, to_flat
from raylab.knobs import ConfigError, base_type

PRESETS: dict[str, dict[str, Any]] = {
    # A GPU cluster: 4 GPU workers per trial, GPU sampler/scorer/eval actors. The scorer is a WRN-28-10 over 5M
    # images: on a GPU, not a CPU actor. Spot GPU nodes vanish: each Train run and Tune trial may restart 3 times
    # (from its last checkpoint) before the sweep fails.
    "paper": {
        "resources.use_gpu": True, "resources.num_workers": 4, "resources.gpus_per_actor": 1.0,
        "resources.sampler_actors": 4, "resources.scorer_actors": 1, "resources.scorer_gpus_per_actor": 1.0,
        "resources.eval_actors": 4, "resources.max_failures": 3, "train.bf16": True,
    },
    "tiny": {
        "data.dataset": "digits", "data.val_size": 128,
        # The committed digits EDM (raylab/assets/edm-digits): 16 channels down to 8x8 (a 16x16 floor gave blobs),
        # p_mean 0 puts more training noise levels where digits get their global shape (sample accuracy by a
        # digits classifier 0.87 at 40 kimg vs 0.26 at p_mean -1.2).
        "edm.model_channels": 16, "edm.channel_mult": (1, 2, 2), "edm.num_blocks": 1, "edm.attn_resolutions": (),
        "edm.dropout": 0.0, "edm.augment_dim": 0, "edm.batch_size": 32, "edm.lr": 0.004, "edm.total_kimg": 40.0,
        "edm.warmup_kimg": 0.5, "edm.ema_halflife_kimg": 0.5, "edm.checkpoint_every_kimg": 2.0, "edm.p_mean": 0.0,
        "generate.steps": 10, "generate.per_class": 60, "generate.shard_size": 200, "generate.batch_size": 64,
        # Half, not the paper's 20%: 60 per class leaves 30 selected images per class.
        "select.scorer_model": "wrn-16-2", "select.top_fraction": 0.5,
        # Issue 13: a model sized for 2 CPU cores (WRN-10-1 takes a TRADES-3 step of 64 digits in 0.22 s, WRN-16-2 in
        # 1.00 s), trained to converge: 12 epochs of ~22 steps.
        "model.name": "wrn-10-1",
        "train.epochs": 12, "train.batch_size": 64, "train.lr": 0.1, "train.schedule_per": "step",
        # BN running stats with momentum 0.01 lag far behind in a few hundred steps: re-estimate them for the
        # EMA model before each evaluation instead (paper scale keeps the reference's copy).
        "train.ema_bn": "recompute", "train.val_pgd_steps": 5, "train.augment": "crop",  # digits: no mirror images
        "train.checkpoint_every": 1, "attack.steps": 3,
        # Digits have 17 gray levels, so one level is 1/16 ~ 16/255. At 8/255 (half a level) a 16-epoch WRN-10-1
        # measured 98.7% clean, 94.0% PGD-10, 94.0% AA: saturated, every arm alike. One level separates them.
        "attack.eps": 16 / 255, "eval.eps": 16 / 255,
        # The whole test set (300), and APGD-CE + APGD-T so that AA can never sit above PGD; 25 iterations, 1
        # restart, 3 targets keep it at ~20 s per model on 2 cores (the library's custom budget took 305 s).
        "eval.num_test": 0, "eval.pgd_steps": 10, "eval.autoattack": "custom", "eval.aa_attacks": "apgd-ce,apgd-t",
        "eval.aa_iters": 25, "eval.aa_restarts": 1, "eval.aa_target_classes": 3,
        "eval.chunk_size": 150, "eval.batch_size": 150, "eval.certify_n": 200,
        # A sweep's trials run side by side, each stage on one core with one torch thread (issue 25): on 2 cores a
        # WRN-10-1 TRADES step trains 1.46x faster on 2 threads than on 1, so two 1-thread trials do 1.37x the work
        # of one 2-thread trial, and one trial's start-up, generation and evaluation overlap another's training.
        # 3 trials' workers (or 1 generation's sampler + scorer beside 2) fit the local Ray's 4 logical CPUs.
        "resources.num_workers": 1, "resources.cpus_per_worker": 1, "resources.eval_actors": 1,
        "sweep.max_concurrent": 3,
    },
}


# `smoke` shrinks `tiny` further so a whole sweep runs in CI in a minute or two per trial (every verb and every
# experiment script takes the same three names: tiny | smoke | paper).
PRESETS["smoke"] = {
    **PRESETS["tiny"], "generate.per_class": 12, "generate.shard_size": 60, "generate.steps": 4,
    "select.top_fraction": 0.5, "data.max_train": 128, "data.val_size": 32, "train.epochs": 1,
    "train.batch_size": 32, "attack.steps": 1, "train.val_pgd_steps": 2, "eval.num_test": 32, "eval.pgd_steps": 2,
    "eval.chunk_size": 16, "eval.batch_size": 16, "resources.cpus_per_worker": 1, "resources.eval_actors": 1,
    # One trial at a time: the rehearsals stop a smoke sweep after its first trial's checkpoint and check that the
    # requeued run trains the rest; side by side, both trials' single epochs end together.
    "sweep.max_concurrent": 1,
}


def explain(key: str) -> str:
    """`raylab config --explain KEY`: the key's documentation, type, default and allowed range or choices."""
    section, name = split_key(key)
    f = next(f for f in fields(STAGES[section]) if f.name == name)
    meta, (base, optional) = f.metadata, base_type(typing.get_type_hints(STAGES[section])[name])
    allowed = (f"one of {', '.join(map(str, meta['choices']))}" if meta.get("choices") else
               " and ".join(part for part in (
                   f"{'>' if meta.get('lo_open') else '>='} {meta['lo']}" if meta.get("lo") is not None else "",
                   f"<= {meta['hi']}" if meta.get("hi") is not None else "") if part) or "any")
    kind = getattr(base, "__name__", str(base)) + (" or none" if optional else "")
    doc = meta.get("doc") or "(no documentation)"
    return "\n".join([f"{key}: {doc}", f"  type: {kind}; default (paper): {f.default!r}; "
                      f"tiny: {PRESETS['tiny'].get(key, f.default)!r}", f"  allowed: {allowed}"])


# The paper preset's per-dataset values. CIFAR-10 has none: the config's defaults are its values, and the ablation
# tables (Wang et al. 2023 Tables 4-9) are CIFAR-10 tables. On another dataset these win over an experiment's
# defaults (`make_config`), so `ablate_steps --preset paper --set data.dataset=cifar100` generates CIFAR-100's 5M,
# not CIFAR-10's 500K per class for 100 classes (50M).
DATASET_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "cifar100": {
            "generate.steps": 25,          # Wang et al. 2023 §5.4 and App. B.3 Table 11: best FID (2.09) at 25 steps
            "generate.per_class": 50_000,  # App. A: 50K per class (5M), top 20% per class kept = 1M (10K per class)
        },
        "svhn": {
            "generate.steps": 25,          # the reference README: their SVHN EDM (FID 1.39) samples in 25 steps
            "generate.per_class": 100_000,  # the published SVHN 1M set (training_recipe.md §2)
            "select.policy": "none",       # "SVHN is never filtered" (training_recipe.md §2, the reference's edm/)
            # The reference's SVHN loaders (core/data/svhn*.py) train on ToTensor() alone: no crop, and no flips,
            # which would mirror digits into other digits.
            "train.augment": "none",
        },
    },
}

# Keys a preset derives from others, where neither an experiment nor --set gives them.
PRESET_RULES: dict[str, dict[str, Callable[[ExperimentConfig], Any]]] = {
    # Wang et al. 2023 §3: ratio 0.3 for 1M generated images, 0.2 above (so Table 4's 20M and Table 8's 5M get 0.2).
    "paper": {"train.ratio": lambda cfg: paper_ratio(kept_images(cfg))},
}


def dataset_values(preset: str, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's own values for the dataset `flat` names (default: the config's dataset)."""
    return dict(DATASET_PRESETS.get(preset, {}).get(str(flat.get("data.dataset", DataConfig.dataset)), {}))


def make_config(preset: str = "tiny", overrides: Mapping[str, Any] | None = None,
                defaults: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """`--preset NAME --set KEY=VALUE ...`: the preset, an experiment's `defaults`, the dataset's own values, the
    preset's rules for keys nobody gave, then the overrides on top (module docstring)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    given = {**(defaults or {}), **(overrides or {})}
    per_dataset = dataset_values(preset, {**PRESETS[preset], **given})
    cfg = from_flat({**PRESETS[preset], **(defaults or {}), **per_dataset, **(overrides or {})})
    derived = {key: rule(cfg) for key, rule in PRESET_RULES.get(preset, {}).items() if key not in given}
    cfg = override(cfg, derived) if derived else cfg
    check_amount(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# `--miniature`: the paper configuration with only its sizes shrunk, for a dress rehearsal on CPUs. Every other knob
# stays the paper's: dataset and archive format, model family, selection and ratio rules, attack, schedule shape,
# EMA, validation and evaluation protocol, resources layout (GPUs become CPUs) and max_failures.

MINIATURE_IMAGES = 20_000   # generated images: 500K per class -> 25; Table 5's 1M -> 50, 5M -> 250, 20M -> 1,000
MINIATURE_BATCH = 8         # 512 -> 64: a batch's generated part (45) fits the smallest miniature set (50 kept)
MINIATURE_EPOCHS = 200      # 400 epochs -> 2; a checkpoint every 10 epochs -> every epoch
MINIATURE_KIMG = 100_000    # EDM training: 200,000 kimg -> 2 kimg (warm-up, EMA half-life alike)
MINIATURE_HELD_OUT = 64     # validation and test images (the papers: 1,024 and the whole test set)


def shrink(n: float, factor: float) -> int:
    return max(1, math.ceil(n / factor))


def smallest_member(name: str) -> str:
    """The model family's smallest registered member: wrn-28-10 -> wrn-10-1 (by depth, then width)."""
    family = [m for m in MODELS if m.split("-")[0] == name.split("-")[0]]
    return min(family, key=lambda m: tuple(int(p) for p in m.split("-")[1:] if p.isdigit()))


MINIATURE: dict[str, Callable[[Any], Any]] = {
    # Image counts shrink together, so the paper's rules by amount (top 20% up to 1M, ratio 0.3 / 0.2) pick what
    # they pick at full size; they are applied at full size first (`miniature`).
    "generate.per_class": lambda n: shrink(n, MINIATURE_IMAGES),
    "select.amount": lambda n: n and shrink(n, MINIATURE_IMAGES),
    "generate.shard_size": lambda n: shrink(n, 100),                   # 10,000 -> 100: a set is still several shards
    "train.batch_size": lambda b: shrink(b, MINIATURE_BATCH),
    "train.epochs": lambda e: shrink(e, MINIATURE_EPOCHS),
    "train.checkpoint_every": lambda e: shrink(e, MINIATURE_EPOCHS),
    "data.val_size": lambda n: MINIATURE_HELD_OUT,
    "eval.num_test": lambda n: MINIATURE_HELD_OUT,
    "model.name": smallest_member,
    "select.scorer_model": smallest_member,
    "edm.model_channels": lambda c: shrink(c, 8),                       # DDPM++ 128 -> 16 channels
    "edm.num_blocks": lambda b: 1,
    "edm.batch_size": lambda b: shrink(b, 16),                          # 512 -> 32
    **{f"edm.{k}": (lambda v: v / MINIATURE_KIMG) for k in ("total_kimg", "warmup_kimg", "ema_halflife_kimg")},
    "edm.checkpoint_every_kimg": lambda k: k / (MINIATURE_KIMG / 10),   # 4 checkpoints a run
    "resources.use_gpu": lambda _: False,
    "resources.gpus_per_actor": lambda _: 0.0,
    "resources.scorer_gpus_per_actor": lambda _: 0.0,
}


def miniature(cfg: ExperimentConfig, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """`cfg` (resolved at full size, its rules applied) with the MINIATURE sizes shrunk; `overrides` (--set) still
    win, taken literally."""
    flat = to_flat(cfg)
    return override(cfg, {**{k: shrink_key(k, flat[k]) for k in MINIATURE}, **(overrides or {})})


def shrink_key(key: str, value: Any) -> Any:
    """A value of `key` as the miniature has it (a swept amount: 1M -> 40); keys that are not sizes stay."""
    return MINIATURE[key](value) if key in MINIATURE else value
