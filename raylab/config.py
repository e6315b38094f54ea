"""Typed experiment configuration: one frozen dataclass per stage, composed into `ExperimentConfig`.

The same flat dotted keys (``"train.lr"``, ``"attack.eps"``) are the CLI overrides (``--set train.lr=0.2``),
the Ray Tune search space and the MLflow params. Every value is checked when a config is built, so an invalid
config cannot exist and no compute starts on one. Errors are one line: the key, the value, what is allowed.

Defaults are the Wang et al. 2023 recipe (WRN-28-10, see `reference/training_recipe.md`);
`raylab.presets` holds the named presets (`tiny` shrinks every stage to run on 2 CPU cores).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence

from raylab.knobs import ConfigError, Stage, knob


# ---------------------------------------------------------------------------------------------------------------
# The stages. Names used as choices here are the keys of the registries in the stage rooms; tests check both agree.

DATASETS = ("cifar10", "cifar100", "svhn", "digits")
MODELS = ("wrn-10-1", "wrn-10-2", "wrn-16-2", "wrn-28-10", "wrn-34-10", "wrn-34-20", "wrn-70-16", "resnet18")
# The largest eps per norm whose ball in [0, 1] pixel space is a threat model (beyond, it holds every image): linf 1;
# l2 sqrt(3072), the diagonal of the 32x32x3 unit cube (l2 eps above 1 is normal: Wang et al. 2023 use 128/255).
EPS_MAX = {"linf": 1.0, "l2": math.sqrt(3072)}


@dataclass(frozen=True)
class DataConfig(Stage):
    SECTION = "data"
    dataset: str = knob("cifar10", choices=DATASETS, doc="original (real) dataset")
    root: str = knob("data", doc="directory holding the dataset archives")
    download: bool = knob(False, doc="download missing archives (checksummed); never in tests")
    val_size: Optional[int] = knob(None, lo=0, doc="first N training images held out for validation; None = the "
                                   "dataset's default (CIFAR/SVHN: 1024 as in the papers, digits: 128)")
    max_train: int = knob(0, lo=0, doc="cap on original training images, 0 = all (tiny runs)")


@dataclass(frozen=True)
class EDMConfig(Stage):
    """EDM network and its training (Karras et al. 2022, reference/edm.md §2)."""
    SECTION = "edm"
    arch: str = knob("ddpmpp", choices=("ddpmpp", "ncsnpp"))
    precond: str = knob("edm", choices=("edm", "vp", "ve"))
    model_channels: int = knob(128, lo=1)
    channel_mult: tuple[int, ...] = knob((2, 2, 2))
    num_blocks: int = knob(4, lo=1)
    attn_resolutions: tuple[int, ...] = knob((16,))
    dropout: float = knob(0.13, lo=0.0, hi=1.0)
    augment_dim: int = knob(9, lo=0, doc="EDM augmentation-label width (0 = no augment conditioning)")
    conditional: bool = knob(True, doc="class-conditional (label_dim = num classes) or unconditional")
    batch_size: int = knob(512, lo=1)
    lr: float = knob(1e-3, lo=0.0, lo_open=True)
    total_kimg: float = knob(200_000.0, lo=0.0, lo_open=True, doc="training length in thousands of images")
    warmup_kimg: float = knob(10_000.0, lo=0.0)
    ema_halflife_kimg: float = knob(500.0, lo=0.0)
    ema_rampup: float = knob(0.05, lo=0.0, doc="half-life <= rampup * images seen; 0 = off")
    xflip: bool = knob(False, doc="random horizontal flips of training images")
    p_mean: float = knob(-1.2)
    p_std: float = knob(1.2, lo=0.0, lo_open=True)
    sigma_data: float = knob(0.5, lo=0.0, lo_open=True)
    checkpoint_every_kimg: float = knob(5000.0, lo=0.0, lo_open=True)
    seed: int = knob(0, lo=0)

    def check(self) -> None:
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"edm.channel_mult: {self.channel_mult} must be positive integers")


@dataclass(frozen=True)
class GenerateConfig(Stage):
    """Sampling a generated set (EDM Algorithm 2; Wang et al. 2023 uses 20 Heun steps)."""
    SECTION = "generate"
    generator: str = knob("edm", choices=("edm", "gaussian", "none"))
    checkpoint: str = knob("", doc="generator weights; '' = the committed tiny digits EDM")
    steps: int = knob(20, lo=1)
    solver: str = knob("heun", choices=("heun", "euler"))
    sigma_min: float = knob(0.002, lo=0.0, lo_open=True)
    sigma_max: float = knob(80.0, lo=0.0, lo_open=True)
    rho: float = knob(7.0, lo=0.0, lo_open=True)
    s_churn: float = knob(0.0, lo=0.0)
    s_min: float = knob(0.0, lo=0.0)
    s_max: float = knob(math.inf, lo=0.0, inf=True)
    s_noise: float = knob(1.0, lo=0.0)
    per_class: int = knob(500_000, lo=1, doc="images generated per class (Wang et al. 2023: 500K, top 20% kept)")
    shard_size: int = knob(10_000, lo=1, doc="seeds per Parquet shard")
    seed: int = knob(0, lo=0, doc="dataset seed; image i of class c is seeded by (seed, c, i)")
    seed_mode: str = knob("disjoint", choices=("disjoint", "shared"),
                          doc="shared = the reference's reuse of the same seeds for every class")
    batch_size: int = knob(512, lo=1, doc="images per sampler call")
    latents_on_cpu: bool = knob(True, doc="draw latents on CPU so bytes do not depend on the accelerator")
    gaussian_rank: int = knob(256, lo=0, doc="gaussian generator: covariance = top-k eigenvectors + diagonal "
                              "residual (0 = the full 3072x3072 matrix; digits is exact either way)")
    inception_weights: str = knob("", doc="TorchScript Inception-v3 feature file (e.g. StyleGAN2-ADA's "
                                  "inception-2015-12-05.pt) for Inception FID of the set; '' = off")

    def check(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ConfigError(f"generate.sigma_min: {self.sigma_min} must be < generate.sigma_max {self.sigma_max}")


@dataclass(frozen=True)
class SelectConfig(Stage):
    """Scoring and selection of generated images (Wang et al. 2023 App. A; Sehwag et al. 2022 two-classifier filter)."""
    SECTION = "select"
    policy: str = knob("topk", choices=("topk", "none", "agreement", "pseudo"))
    top_fraction: float = knob(0.2, lo=0.0, hi=1.0, lo_open=True, doc="per-class fraction kept by topk")
    amount: int = knob(0, lo=0, doc="balanced per-class prefix of the view, 0 = all")
    scorer_model: str = knob("wrn-28-10", choices=MODELS)
    scorer_checkpoint: str = knob("", doc="scorer of `raylab generate`, with a config.json beside it stating its "
                                  "architecture ('' = the committed tiny digits scorer, 'none' = no scores); "
                                  "`raylab select` uses the scores stored with the set")
    second_checkpoint: str = knob("", doc="second scorer for the agreement policy")
    agreement_confidence: float = knob(0.9, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class ModelConfig(Stage):
    SECTION = "model"
    name: str = knob("wrn-28-10", choices=MODELS)
    activation: str = knob("silu", choices=("silu", "relu"))


@dataclass(frozen=True)
class AttackConfig(Stage):
    """The training attack (Wang et al. 2023: PGD-10, eps 8/255, step 2/255)."""
    SECTION = "attack"
    norm: str = knob("linf", choices=("linf", "l2"))
    eps: float = knob(8 / 255, lo=0.0)
    step: Optional[float] = knob(None, lo=0.0, doc="None: eps/4 for linf (2/255 at 8/255), 2*eps/steps for l2 (the "
                                 "reference's l2-pgd); also the validation PGD's step")
    steps: int = knob(10, lo=1)
    precision: str = knob("train", choices=("train", "fp32"), doc="the training attack's forward/backward passes: "
                          "'train' = as train.bf16 says, 'fp32' = outside bf16 autocast (raylab.precision)")


@dataclass(frozen=True)
class TrainConfig(Stage):
    """Adversarial training (reference/training_recipe.md §1; paper defaults)."""
    SECTION = "train"
    loss: str = knob("trades", choices=("trades", "pgd_at", "ce", "stability"))
    beta: Optional[float] = knob(5.0, lo=0.0, doc="TRADES/stability weight; required by those losses")
    epochs: int = knob(400, lo=1)
    batch_size: int = knob(512, lo=1, doc="global batch, split over workers")
    lr: float = knob(0.2, lo=0.0, lo_open=True)
    lr_base_batch: int = knob(0, lo=0, doc="linear scaling lr * batch/base; 0 = off")
    momentum: float = knob(0.9, lo=0.0, hi=1.0)
    nesterov: bool = knob(True)
    weight_decay: float = knob(5e-4, lo=0.0, doc="not applied to BN parameters")
    scheduler: str = knob("onecycle", choices=("onecycle", "cosine", "constant"))
    schedule_per: str = knob("epoch", choices=("epoch", "step"), doc="reference steps its one-cycle per epoch")
    warmup_frac: float = knob(0.025, lo=0.0, hi=1.0)
    label_smoothing: float = knob(0.1, lo=0.0, hi=1.0)
    ema_tau: float = knob(0.995, lo=0.0, hi=1.0)
    ema_warmup_frac: float = knob(0.025, lo=0.0, hi=1.0)
    ema_bn: str = knob("copy", choices=("copy", "average", "recompute"))
    ratio: float = knob(0.3, lo=0.0, hi=1.0, doc="original fraction of every batch")
    epoch_length: str = knob("original", choices=("original", "generated"))
    augment: str = knob("crop_flip", choices=("none", "crop", "crop_flip", "cutout", "cutmix", "mixup"),
                        doc="crop = no flips, for digits (a mirrored 2 or 7 is not a digit)")
    attack_bn: str = knob("train_frozen", choices=("train_frozen", "eval"))
    noise_sigma: float = knob(0.25, lo=0.0, doc="Gaussian sigma of the stability loss (Sehwag et al. 2022)")
    grad_clip: float = knob(0.0, lo=0.0, doc="0 = off")
    bf16: bool = knob(False, doc="bf16 autocast of the training forward/backward, fp32 weights (raylab.precision)")
    tf32: bool = knob(True, doc="GPU: TF32 tensor cores for fp32 matmuls and convolutions (raylab.runtime)")
    deterministic: bool = knob(False, doc="GPU: deterministic kernels, no cudnn.benchmark autotuning, for an exact "
                               "resume; costs speed (bench/gpu.py: 'step bf16 deterministic' vs 'step bf16') and an "
                               "op without a deterministic CUDA kernel fails at its first call (raylab.runtime)")
    channels_last: bool = knob(True, doc="channels_last memory format: on by default, faster with oneDNN on CPU "
                                "(x1.17 a TRADES step, bench_train_step.py) and with tensor cores on GPU")
    val_pgd_steps: int = knob(40, lo=1)
    checkpoint_every: int = knob(10, lo=1)
    seed: int = knob(1, lo=0)

    def check(self) -> None:
        if self.loss in ("trades", "stability") and self.beta is None:
            raise ConfigError(f"train.beta: required by train.loss={self.loss} (the reference silently "
                              "switched to PGD-AT; raylab refuses)")


@dataclass(frozen=True)
class EvalConfig(Stage):
    SECTION = "eval"
    num_test: int = knob(0, lo=0, doc="test images evaluated, 0 = all")
    checkpoint: str = knob("best", choices=("best", "last"))
    pgd_steps: int = knob(40, lo=1)
    autoattack: str = knob("standard", choices=("standard", "plus", "custom", "none"))
    aa_attacks: str = knob("apgd-ce,apgd-t", doc="attacks of the custom version")
    # The custom version's budget (defaults: the library's custom settings). Smaller is cheaper and weaker; the
    # tables then name it, e.g. "AA (apgd-ce,apgd-t; 25 it, 1 restart, 3 targets)".
    aa_iters: int = knob(100, lo=1, doc="APGD iterations per restart and target (custom version only)")
    aa_restarts: int = knob(5, lo=1, doc="APGD-CE/DLR restarts (custom version only; standard runs 1)")
    aa_target_classes: int = knob(9, lo=1, doc="APGD-T target classes (custom version only)")
    norm: str = knob("linf", choices=("linf", "l2"))
    eps: float = knob(8 / 255, lo=0.0)
    transfer: bool = knob(False, doc="a threat model other than the training attack's is intended (transfer "
                          "evaluation): reported as such instead of as a mismatch warning")
    chunk_size: int = knob(500, lo=1, doc="test images per resumable chunk")
    batch_size: int = knob(250, lo=1)
    seed: int = knob(0, lo=0)
    bf16: bool = knob(False, doc="bf16 autocast for every eval measure; off: fp32 (TF32 per eval.tf32)")
    tf32: bool = knob(True, doc="GPU: TF32 convolutions and matmuls, PyTorch's cuDNN default (raylab.runtime)")
    certify: bool = knob(False)
    certify_sigma: float = knob(0.25, lo=0.0, lo_open=True)
    certify_n0: int = knob(100, lo=1)
    certify_n: int = knob(10_000, lo=1)
    certify_alpha: float = knob(0.001, lo=0.0, hi=1.0, lo_open=True)

    @property
    def custom_attacks(self) -> tuple[str, ...]:
        """eval.aa_attacks as names (the custom version's cascade, in order)."""
        return tuple(a.strip() for a in self.aa_attacks.split(",") if a.strip())

    def check(self) -> None:
        budget = [f for f in fields(self) if f.name in ("aa_iters", "aa_restarts", "aa_target_classes")]
        changed = [f.name for f in budget if getattr(self, f.name) != f.default]
        # 'none' runs no AutoAttack, so a preset's custom budget is inert there rather than wrong.
        if changed and self.autoattack in ("standard", "plus"):
            name, default = changed[0], next(f.default for f in budget if f.name == changed[0])
            raise ConfigError(f"eval.{name}: {getattr(self, name)} applies only with eval.autoattack=custom "
                              f"(version {self.autoattack!r} fixes its own budget; set eval.{name}={default})")


@dataclass(frozen=True)
class CostConfig(Stage):
    """Per-device throughput behind `raylab plan`'s device-hours. Defaults: the A100 figures Wang et al. 2023 publish
    (App. B.2); `raylab.cost` documents how each is derived."""
    SECTION = "cost"
    device: str = knob("A100", doc="the device the figures describe (a label in plans)")
    sample_nfe_per_s: float = knob(1240.0, lo=0.0, lo_open=True, doc="EDM network evaluations (images x NFE) per "
                                   "second per device; Table 10: 5M images at 20 steps (39 NFE) on 4 A100 in 10.92 h")
    train_img_per_s: float = knob(0.0, lo=0.0, doc="TRADES training images per second per device at attack.steps=10; "
                                  "0 = the model's published figure (raylab.cost.TRAIN_IMG_PER_S)")


@dataclass(frozen=True)
class SweepConfig(Stage):
    SECTION = "sweep"
    name: str = knob("sweep")
    search: str = knob("grid", choices=("grid", "random", "asha"))
    num_samples: int = knob(1, lo=1)
    max_concurrent: int = knob(1, lo=1)
    metric: str = knob("", doc="what Tune ranks trials by; '' = the validation PGD accuracy, val_pgd{k}_acc with "
                       "k = train.val_pgd_steps")
    mode: str = knob("max", choices=("max", "min"))


@dataclass(frozen=True)
class TrackingConfig(Stage):
    SECTION = "tracking"
    root: str = knob("runs", doc="run root: run directories, shards, views, checkpoints, Ray Train/Tune storage, "
                     "MLflow artifacts (default store); on a cluster the shared root every node mounts")
    uri: str = knob("", doc="MLflow tracking URI; '' = $MLFLOW_TRACKING_URI or sqlite under root")
    experiment: str = knob("raylab")
    ui_port: int = knob(5000, lo=1, hi=65535)


@dataclass(frozen=True)
class ResourcesConfig(Stage):
    """Where things run (maps onto Ray's ScalingConfig and actor pools)."""
    SECTION = "resources"
    num_workers: int = knob(1, lo=0, doc="Ray Train workers; 0 = local mode in the driver")
    use_gpu: bool = knob(False)
    cpus_per_worker: float = knob(1.0, lo=0.0)
    sampler_actors: int = knob(1, lo=1)
    scorer_actors: int = knob(1, lo=1)
    eval_actors: int = knob(1, lo=1)
    cpus_per_actor: float = knob(1.0, lo=0.0, doc="per sampler / eval actor")
    gpus_per_actor: float = knob(0.0, lo=0.0, doc="per sampler / eval actor")
    scorer_cpus_per_actor: float = knob(1.0, lo=0.0, doc="per scorer actor (own pool, own resources)")
    scorer_gpus_per_actor: float = knob(0.0, lo=0.0, doc="per scorer actor; a fraction shares a GPU")
    placement: str = knob("PACK", choices=("PACK", "SPREAD"),
                          doc="Ray Train workers packed on few nodes or spread over many (best effort)")
    max_failures: int = knob(1, lo=0, doc="restarts of a Train run, a Tune trial after a lost worker or node")
    # Without a budget Ray Data streams through most of the object store and every page a worker reads stays in its
    # RSS (shared): +1.26 GiB over one pass of 500k rows, +0.24 GiB with 200 MiB (bench/bench_train_ray.py).
    ingest_object_store_mb: int = knob(256, lo=0, doc="object-store budget (MiB) of the training ingest, all "
                                                       "workers together; 0 = Ray Data's default")


STAGES: dict[str, type[Stage]] = {cls.SECTION: cls for cls in (
    DataConfig, EDMConfig, GenerateConfig, SelectConfig, ModelConfig, AttackConfig, TrainConfig, EvalConfig,
    SweepConfig, CostConfig, TrackingConfig, ResourcesConfig)}


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        workers = max(self.resources.num_workers, 1)
        if self.train.batch_size % workers:
            raise ConfigError(f"train.batch_size: {self.train.batch_size} is not divisible by "
                              f"resources.num_workers={self.resources.num_workers}")
        if self.edm.batch_size % workers:
            raise ConfigError(f"edm.batch_size: {self.edm.batch_size} is not divisible by "
                              f"resources.num_workers={self.resources.num_workers}")
        if self.attack.step != 0 and self.attack.eps == 0 and self.train.loss in ("trades", "pgd_at"):
            raise ConfigError("attack.eps: 0 makes adversarial training a no-op; use train.loss=ce")
        for stage in (self.attack, self.eval):
            if stage.eps > EPS_MAX[stage.norm]:
                raise ConfigError(f"{stage.SECTION}.eps: {stage.eps:g} is out of range for {stage.SECTION}.norm="
                                  f"{stage.norm} (must be <= {EPS_MAX[stage.norm]:.4g} in [0, 1] pixels, e.g. "
                                  f"{'8/255' if stage.norm == 'linf' else '128/255'})")


# ---------------------------------------------------------------------------------------------------------------
# Flat dotted dicts <-> config.

def to_flat(cfg: ExperimentConfig) -> dict[str, Any]:
    """{"train.lr": 0.2, ...}: the MLflow params, the Tune search space and the CLI keys."""
    return {f"{section}.{k}": v for section in STAGES for k, v in dataclasses.asdict(getattr(cfg, section)).items()}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in STAGES.items() for f in fields(cls)]


def split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in STAGES or name not in {f.name for f in fields(STAGES[section])}:
        close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown config key{hint}")
    return section, name


def override(cfg: ExperimentConfig, flat: Mapping[str, Any]) -> ExperimentConfig:
    """A new config with the flat overrides applied (strings are parsed: '8/255', 'true', '2,2,2')."""
    per_section: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = split_key(key)
        per_section.setdefault(section, {})[name] = value
    stages = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in per_section.items()}
    return dataclasses.replace(cfg, **stages)


def from_flat(flat: Mapping[str, Any], base: ExperimentConfig | None = None) -> ExperimentConfig:
    return override(base or ExperimentConfig(), flat)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """CLI `--set key=value` items -> flat dict (values stay strings and are parsed by `override`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _strict(value: Any) -> Any:
    """inf as the string "inf" (parsed back by `from_json`): `Infinity` is not JSON, and jq or JS readers reject it."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def to_json(cfg: ExperimentConfig) -> str:
    nested = {s: {k: _strict(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in STAGES}
    return json.dumps(nested, indent=2, sort_keys=True, allow_nan=False)


def from_json(text: str) -> ExperimentConfig:
    nested = json.loads(text)
    return from_flat({f"{s}.{k}": v for s, kv in nested.items() for k, v in kv.items()})


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# Where inputs and outputs live, not what a run computes: kept out of content addresses, so a run or a sweep is
# found again from another working directory (sweep drivers pin them to absolute paths for their trials). The cost
# figures only feed plans, so they stay out too.
LOCATION_KEYS = ("data.root", "data.download", "tracking", "cost")


def pin_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Absolute data and run roots. Tune trials and Ray Train workers run in their own working directories: the
    default relative `tracking.root=runs` read there once sent every sweep trial to an empty MLflow store."""
    return override(cfg, {key: os.path.abspath(to_flat(cfg)[key]) for key in ("data.root", "tracking.root")})


def identity_flat(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flat config without LOCATION_KEYS."""
    return {k: v for k, v in to_flat(cfg).items() if not _under(k, LOCATION_KEYS)}


def fingerprint(cfg: ExperimentConfig, keys: list[str]) -> str:
    """Content address of the part of a config that produces an artifact (keys may be sections or full keys)."""
    chosen = {k: v for k, v in identity_flat(cfg).items() if _under(k, keys)}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]
