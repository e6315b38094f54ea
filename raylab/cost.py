"""Plan and cost before spending (`raylab plan`, `experiments/ablate_*.py --plan`): per stage, the images to
generate and keep, shards and bytes on storage, training steps and device-hours, for one config or a sweep whose
arms share artifacts (a shared generation or view is counted once). Pure arithmetic: nothing is loaded or run.

Device-hours come from per-device throughput (`cost.*`). The defaults are the A100 figures of Wang et al. 2023
App. B.2:
- sampling: Table 10, 5M class-conditional images at 20 Heun steps (39 NFE) on 4 A100 in 10.92 h, 1,240
  image-evaluations/s per device (edm.md "Throughput"); the 5- to 40-step rows agree within 3%;
- training (TRAIN_IMG_PER_S): WRN-28-10 at batch 2048 on 4 A100, 3.45 min per epoch of 25 steps (51,200 images,
  training_recipe.md "How an epoch is defined"), 61.8 img/s per device; WRN-70-16 at batch 1024 on 8 A100, 9.93 min
  per epoch of 49 steps (50,176 images), 10.5 img/s per device. Both TRADES with a 10-step attack.

Derived, not published (plans mark them "est."):
- a TRADES image with a K-step attack costs about K + 2 forward-backward passes and a forward about a third of one,
  so other step counts, the scorer's forward pass and evaluation scale from the training figure;
- evaluation passes per test image: PGD-k k + 1; AutoAttack from its attacks' default iterations (APGD-CE 100,
  APGD-T 9 targets x 100, FAB-T 9 x 100, Square 5,000 forward queries; the custom version at its `eval.aa_*`
  budget), each attack after the first running on the ~60% of points still robust;
- validation after every training epoch: PGD-k of the validation images and a clean pass over the test set, split
  over the resources.num_workers devices, all of them held until the largest share is done (`validation_s`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from raylab.amounts import generated_images, kept_images
from raylab.attacks.pgd import default_step
from raylab.config import EvalConfig, ExperimentConfig, fingerprint, override
from raylab.knobs import ConfigError
from raylab.data.datasets import get_dataset
from raylab.data.mix import steps_per_epoch
from raylab.data.shard_format import IMAGE_BYTES
from raylab.generate.sampler import expected_nfe
from raylab.runs import GENERATION_KEYS

TRAIN_IMG_PER_S: dict[str, float] = {"wrn-28-10": 61.8, "wrn-70-16": 10.5}  # A100, TRADES PGD-10 (see above)
PUBLISHED_ATTACK_STEPS = 10
ROW_BYTES = IMAGE_BYTES + 22  # image + label, seed, class_cond, score, pred, confidence (random pixels: no gain
# from compression)
STILL_ROBUST = 0.6
AA_PASSES = {"standard": 100 + STILL_ROBUST * (900 + 900 + 5000 / 3), "plus": 100 + STILL_ROBUST * (
    4 * 100 + 900 + 900 + 5000 / 3 + 9 * 100), "none": 0.0}
# The custom version's passes per attacked image at its budget (eval.aa_iters, aa_restarts, aa_target_classes);
# FAB and Square keep the library's own settings (5 restarts / 9 targets of 100 iterations, 5,000 queries).
CUSTOM_ATTACK_PASSES: dict[str, Callable[[EvalConfig], float]] = {
    "apgd-ce": lambda ev: ev.aa_iters * ev.aa_restarts, "apgd-dlr": lambda ev: ev.aa_iters * ev.aa_restarts,
    "apgd-t": lambda ev: ev.aa_iters * ev.aa_target_classes, "fab": lambda ev: 5 * 100, "fab-t": lambda ev: 9 * 100,
    "square": lambda ev: 5000 / 3,
}
SCORING_POLICIES = ("topk", "pseudo", "agreement")


@dataclass(frozen=True)
class StagePlan:
    """One stage of one arm. `key` names the artifact it builds: arms with the same key share it."""
    stage: str
    key: str
    images: int = 0          # generated (generate), kept (select), seen in training (train), evaluated (eval)
    shards: int = 0
    bytes: int = 0
    steps: int = 0
    device_s: Optional[float] = None  # None: no throughput figure for this model (set cost.train_img_per_s)
    note: str = ""


def train_rate(cfg: ExperimentConfig) -> Optional[float]:
    """Training images/s per device at the config's attack steps."""
    base = cfg.cost.train_img_per_s or TRAIN_IMG_PER_S.get(cfg.model.name)
    if not base:
        return None
    steps = cfg.attack.steps if cfg.train.loss in ("trades", "pgd_at") else 0
    return base * (PUBLISHED_ATTACK_STEPS + 2) / (steps + 2)


def _passes_s(cfg: ExperimentConfig, images: float, passes: float, model: Optional[str] = None) -> Optional[float]:
    """Seconds of `passes` forward-backward passes of `model` (default: model.name) over `images` on one device."""
    base = cfg.cost.train_img_per_s or TRAIN_IMG_PER_S.get(model or cfg.model.name)
    return None if not base else images * passes / (base * (PUBLISHED_ATTACK_STEPS + 2))


def _score_s(cfg: ExperimentConfig, images: float) -> Optional[float]:
    """A forward pass of the scorer (a third of a forward-backward) over `images`."""
    return _passes_s(cfg, images, 1 / 3, cfg.select.scorer_model)


def _scored(cfg: ExperimentConfig) -> bool:
    return cfg.select.policy in SCORING_POLICIES or cfg.select.scorer_checkpoint not in ("", "none")


def _generate(cfg: ExperimentConfig) -> StagePlan:
    n = generated_images(cfg)
    nfe = expected_nfe(cfg.generate.steps, cfg.generate.solver) if cfg.generate.generator == "edm" else 0
    score = _score_s(cfg, n) if _scored(cfg) else 0.0
    sample = n * nfe / cfg.cost.sample_nfe_per_s
    return StagePlan("generate", "generate-" + fingerprint(cfg, GENERATION_KEYS), n, math.ceil(n / cfg.generate.shard_size),
                     n * ROW_BYTES, device_s=None if score is None else sample + score,
                     note=_sampler_note(cfg, nfe) + (", scored (est.)" if _scored(cfg) else ""))


def _sampler_note(cfg: ExperimentConfig, nfe: int) -> str:
    if cfg.generate.generator != "edm":
        return f"{cfg.generate.generator} generator"
    return f"{cfg.generate.steps} {cfg.generate.solver} steps, {nfe} NFE per image"


def _select(cfg: ExperimentConfig, generated: int) -> StagePlan:
    kept = kept_images(cfg)
    second = _score_s(cfg, generated) if cfg.select.policy == "agreement" else 0.0
    policy = f"top {cfg.select.top_fraction:.0%} per class" if cfg.select.policy == "topk" else cfg.select.policy
    note = "agreement, at most (it drops an unknown share)" if cfg.select.policy == "agreement" else policy
    return StagePlan("select", "view-" + fingerprint(cfg, GENERATION_KEYS + ["select"]), kept, device_s=second,
                     note=note)


def _originals(cfg: ExperimentConfig) -> tuple[int, int]:
    spec = get_dataset(cfg.data.dataset)
    val = spec.val_size if cfg.data.val_size is None else cfg.data.val_size
    train = max(spec.sizes[0] - val, 0)
    return (min(train, cfg.data.max_train) if cfg.data.max_train else train), val


def _attack_note(cfg: ExperimentConfig) -> str:
    if cfg.train.loss not in ("trades", "pgd_at"):
        return cfg.train.loss
    step = cfg.attack.step if cfg.attack.step is not None else default_step(cfg.attack.norm, cfg.attack.eps,
                                                                             cfg.attack.steps)
    return (f"{cfg.train.loss}, {cfg.attack.norm} PGD-{cfg.attack.steps} eps {cfg.attack.eps * 255:g}/255 "
            f"step {step * 255:g}/255")


def validation_s(cfg: ExperimentConfig, val: int) -> Optional[float]:
    """Device-seconds of one epoch's validation (train.worker.validate): PGD-k on the validation images (k
    forward-backward passes, the clean and adversarial forwards and the clean-accuracy forward: k + 1 passes) and a
    clean forward over the test set, each split over the resources.num_workers devices. Every device is held until
    the largest share is done, so that share counts once per device."""
    devices = max(cfg.resources.num_workers, 1)
    test = get_dataset(cfg.data.dataset).sizes[1]
    attack = _passes_s(cfg, math.ceil(val / devices), cfg.train.val_pgd_steps + 1)
    clean = _passes_s(cfg, math.ceil(test / devices), 1 / 3)
    return None if attack is None or clean is None else devices * (attack + clean)


def _train(cfg: ExperimentConfig, kept: int) -> StagePlan:
    originals, val = _originals(cfg)
    # The reference's epoch counts the whole training split, its held-out validation images included.
    per_epoch = steps_per_epoch(cfg.train.epoch_length, batch_size=cfg.train.batch_size, num_original=originals + val,
                                num_generated=kept, ratio=cfg.train.ratio) if originals else 0
    steps = per_epoch * cfg.train.epochs
    images = steps * cfg.train.batch_size
    rate = train_rate(cfg)
    validate = validation_s(cfg, val)
    device_s = None if rate is None or validate is None else images / rate + validate * cfg.train.epochs
    return StagePlan("train", "train-" + fingerprint(cfg, ["data", "generate", "select", "model", "attack", "train"]),
                     images, steps=steps, device_s=device_s,
                     note=f"{cfg.train.epochs} epochs of {per_epoch} steps at batch {cfg.train.batch_size}, ratio "
                          f"{cfg.train.ratio:g}; {_attack_note(cfg)}"
                          + ("" if cfg.attack.steps == PUBLISHED_ATTACK_STEPS else "; est.")
                          + _validation_note(cfg, val, validate, device_s))


def _validation_note(cfg: ExperimentConfig, val: int, validate: Optional[float], total: Optional[float]) -> str:
    devices, test = max(cfg.resources.num_workers, 1), get_dataset(cfg.data.dataset).sizes[1]
    share = "" if validate is None or not total else f" {validate * cfg.train.epochs / total:.0%} (est.)"
    return (f"; validation{share}: PGD-{cfg.train.val_pgd_steps} of {val:,} + clean {test:,} test images per epoch "
            f"over {devices} device{'s' if devices > 1 else ''}")


def aa_passes(ev: EvalConfig) -> float:
    """Forward-backward passes per test image of the configured AutoAttack: the first attack on every image, each
    later one on the ~60% still robust."""
    if ev.autoattack != "custom":
        return AA_PASSES[ev.autoattack]
    names = ev.custom_attacks
    unknown = [a for a in names if a not in CUSTOM_ATTACK_PASSES]
    if unknown or not names:
        raise ConfigError(f"eval.aa_attacks: {ev.aa_attacks!r} must name attacks from {', '.join(CUSTOM_ATTACK_PASSES)}")
    first, *rest = (CUSTOM_ATTACK_PASSES[a](ev) for a in names)
    return first + STILL_ROBUST * sum(rest)


def _aa_name(ev: EvalConfig) -> str:
    if ev.autoattack != "custom":
        return ev.autoattack
    return f"custom ({ev.aa_attacks}; iters/restarts/targets {ev.aa_iters}/{ev.aa_restarts}/{ev.aa_target_classes})"


def _eval(cfg: ExperimentConfig) -> StagePlan:
    n = cfg.eval.num_test or get_dataset(cfg.data.dataset).sizes[1]
    best = cfg.eval.pgd_steps + 1 + aa_passes(cfg.eval)
    last = cfg.eval.pgd_steps + 1  # the last checkpoint: clean + PGD (tune.sweep.evaluate_trial)
    return StagePlan("eval", "eval-" + fingerprint(cfg, ["data", "generate", "select", "model", "attack", "train",
                                                         "eval"]),
                     n, device_s=_passes_s(cfg, n, best + last),
                     note=f"best: PGD-{cfg.eval.pgd_steps} + AutoAttack {_aa_name(cfg.eval)}; last: PGD (est.)")


def plan_arm(cfg: ExperimentConfig) -> list[StagePlan]:
    """The stages one config runs: generate and select only when batches mix in generated images."""
    if cfg.train.ratio >= 1.0:
        return [_train(cfg, 0), _eval(cfg)]
    gen = _generate(cfg)
    sel = _select(cfg, gen.images)
    return [gen, sel, _train(cfg, sel.images), _eval(cfg)]


def sweep_arms(cfg: ExperimentConfig, space: Mapping[str, Sequence[Any]],
               coupled: Optional[Callable[[Any], dict]] = None) -> list[tuple[str, ExperimentConfig]]:
    """(label, config) of every grid point of `space`, with the keys coupled to a one-key sweep's value."""
    keys = list(space)
    arms = []
    for values in itertools.product(*(space[k] for k in keys)):
        flat = dict(zip(keys, values))
        extra = coupled(values[0]) if coupled else {}
        arms.append((",".join(f"{k.split('.')[-1]}={v}" for k, v in flat.items()), override(cfg, {**flat, **extra})))
    return arms


@dataclass(frozen=True)
class Plan:
    arms: list[tuple[str, list[StagePlan]]]
    device: str

    def unique(self) -> dict[str, StagePlan]:
        """Every artifact once, whatever the number of arms that need it (at its dearest estimate: a generation
        shared by arms that select by score and arms that do not is scored once)."""
        out: dict[str, StagePlan] = {}
        for _, stages in self.arms:
            for s in stages:
                if s.key not in out or (s.device_s or 0.0) > (out[s.key].device_s or 0.0):
                    out[s.key] = s
        return out

    def total_s(self, stage: Optional[str] = None) -> Optional[float]:
        chosen = [s for s in self.unique().values() if stage is None or s.stage == stage]
        return None if any(s.device_s is None for s in chosen) else sum(s.device_s or 0.0 for s in chosen)

    def lines(self) -> list[str]:
        shared = _sharing(self.arms)
        out = [f"plan: {len(self.arms)} arm(s); device-hours on {self.device} (cost.*; defaults: Wang et al. 2023 "
               "App. B.2; est. = derived, see raylab.cost)"]
        for label, stages in self.arms:
            out.append(f"{label}:")
            out += [f"  {_stage_line(s)}" + (f"  [shared by {shared[s.key]} arms]" if shared[s.key] > 1 else "")
                    for s in stages]
        totals = "; ".join(f"{st} {_hours(self.total_s(st))}" for st in ("generate", "select", "train", "eval")
                           if any(s.stage == st for s in self.unique().values()))
        out.append(f"total, shared artifacts once: {_hours(self.total_s())} device-h ({totals})")
        if any(s.device_s is None for s in self.unique().values()):
            out.append("? = no published throughput for this model on this device: set cost.train_img_per_s")
        return out


def _sharing(arms: list[tuple[str, list[StagePlan]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, stages in arms:
        for s in stages:
            counts[s.key] = counts.get(s.key, 0) + 1
    return counts


def _hours(seconds: Optional[float]) -> str:
    return "?" if seconds is None else f"{seconds / 3600:,.1f}"


def _stage_line(s: StagePlan) -> str:
    parts = {"generate": f"{s.images:,} images, {s.shards:,} shards, {s.bytes / 1e9:,.1f} GB",
             "select": f"{s.images:,} kept", "train": f"{s.steps:,} steps, {s.images:,} images",
             "eval": f"{s.images:,} test images"}[s.stage]
    return f"{s.stage:<9}{parts}; {_hours(s.device_s)} device-h ({s.note})"


def ledger(generate_s: float, kept: int, train_s: float, eval_s: float, robust_acc: float) -> dict[str, float]:
    """What a trial measurably cost, as MLflow metrics (device-seconds: busy or held time x devices). The generation
    is the shared artifact's whole cost, whichever trial built it."""
    total = generate_s + train_s + eval_s
    return {"cost_generate_device_s": generate_s, "cost_train_device_s": train_s, "cost_eval_device_s": eval_s,
            "cost_total_device_s": total,
            "cost_per_kept_image_s": generate_s / kept if kept else math.nan,
            "cost_per_robust_point_s": total / (100 * robust_acc) if robust_acc > 0 else math.nan}


def make_plan(cfg: ExperimentConfig, space: Optional[Mapping[str, Sequence[Any]]] = None,
              coupled: Optional[Callable[[Any], dict]] = None) -> Plan:
    arms = sweep_arms(cfg, space, coupled) if space else [("run", cfg)]
    return Plan([(label, plan_arm(arm)) for label, arm in arms], cfg.cost.device)
