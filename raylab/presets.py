"""The named presets every verb and experiment script takes (`--preset tiny|smoke|paper`).

`paper` is the config's dataclass defaults on CIFAR-10 (Wang et al. 2023); `tiny` runs every stage on 2 CPU cores on
the embedded digits; `smoke` shrinks `tiny` further for CI. A preset is a flat `{"section.key": value}` table applied
beneath the user's `--set` overrides.
"""
from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any, Mapping

from raylab.config import STAGES, ConfigError, DataConfig, ExperimentConfig, base_type, from_flat, split_key

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
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
        # Trials run one after another, so each stage may use both cores: 2 torch threads in the train worker and
        # 2 eval actors (one chunk each).
        "resources.num_workers": 1, "resources.cpus_per_worker": 2, "resources.eval_actors": 2,
    },
}


# `smoke` shrinks `tiny` further so a whole sweep runs in CI in a minute or two per trial (every verb and every
# experiment script takes the same three names: tiny | smoke | paper).
PRESETS["smoke"] = {
    **PRESETS["tiny"], "generate.per_class": 12, "generate.shard_size": 60, "generate.steps": 4,
    "select.top_fraction": 0.5, "data.max_train": 128, "data.val_size": 32, "train.epochs": 1,
    "train.batch_size": 32, "attack.steps": 1, "train.val_pgd_steps": 2, "eval.num_test": 32, "eval.pgd_steps": 2,
    "eval.chunk_size": 16, "eval.batch_size": 16, "resources.cpus_per_worker": 1, "resources.eval_actors": 1,
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


# The paper preset's per-dataset values, beneath --set: `--preset paper --set data.dataset=cifar100` is Wang et al.
# 2023's CIFAR-100 setting, not CIFAR-10's 500K per class for 100 classes (50M images).
DATASET_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "cifar100": {
            "generate.steps": 25,          # Wang et al. 2023 §4.1 and App. B.3 Table 11: best FID (2.09) at 25 steps
            "generate.per_class": 50_000,  # App. A: 50K per class (5M), top 20% per class kept = 1M (10K per class)
        },
        "svhn": {
            "generate.steps": 25,          # the reference README: their SVHN EDM (FID 1.39) samples in 25 steps
            "generate.per_class": 100_000,  # the published SVHN 1M set (training_recipe.md §2)
            "select.policy": "none",       # "SVHN is never filtered" (training_recipe.md §2, the reference's edm/)
        },
    },
}


def make_config(preset: str = "tiny", overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """`--preset NAME --set KEY=VALUE ...`: the preset, its per-dataset values, then the overrides on top."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    flat = {**PRESETS[preset], **(overrides or {})}
    per_dataset = DATASET_PRESETS.get(preset, {}).get(str(flat.get("data.dataset", DataConfig.dataset)), {})
    return from_flat({**PRESETS[preset], **per_dataset, **(overrides or {})})
