"""EDM training on Ray Train (Karras et al. 2022 §5, reference/edm.md §2): DDP workers, EDMLoss, Adam with a linear
learning-rate warm-up, an EMA by half-life, checkpoints through Ray Train with an exact resume.

Layout: the pure training pieces (batches, one optimizer step, the EMA, the state), then the Ray Train worker
`edm_worker`, then the driver `train_edm(cfg)`. Only the last two touch Ray, and only through `raylab.raytrain`.

Where the randomness comes from, so that a restart from checkpoint k retraces the uninterrupted run:
- data order: the global batch of step s is a slice of a permutation of the training set seeded by
  (edm.seed, epoch), so it is a pure function of s, identical on every rank and independent of the number of
  workers; rank r takes its contiguous share of it;
- σ, the noise and the x-flips: one `torch.Generator` per rank, reseeded from (edm.seed, rank, tick) at the start
  of every tick; dropout (drawn by the network from torch's global RNG, raylab.generate.networks) likewise, inside
  `fork_rng` so the caller's RNG is left alone. Ticks start exactly at checkpoints, so a resumed rank reseeds
  where the first attempt did; the checkpoint therefore carries the tick position (the image count) rather than
  generator states, which also covers ranks > 0 (only rank 0's state reaches the checkpoint).
- the checkpoint holds the network, the EMA, Adam's moments, the image count and the tick history.
Reports go to Ray Train once per tick of `edm.checkpoint_every_kimg` (each `report` can block ~2 s,
reference/ray_mlflow.md §1), each with a checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from raylab.config import EDMConfig, ExperimentConfig, from_flat, to_flat
from raylab.data.datasets import ImageSet, check_dataset, load_splits
from raylab.generate.checkpoint import save_edm
from raylab.generate.loss import EDMLoss, ema_beta, lr_warmup
from raylab.generate.networks import build_edm
from raylab.generate.sampler import sample_kwargs
from raylab.runtime import torch_threads
from raylab.train.ema import blend, unwrap

NETWORK_DIR = "network"  # <run dir>/network: the EMA network, written by rank 0 at the end (save_edm format)
SAMPLES_PNG = "samples.png"  # <run dir>/samples.png: one row per class, also logged to MLflow
ADAM = dict(betas=(0.9, 0.999), eps=1e-8)  # EDM's Adam (train.py defaults; edm.md §2)


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from (edm.seed, what, ...): BLAKE2b, so nearby inputs give unrelated streams."""
    text = ":".join(["raylab/edm-train/v1", *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: no Ray, no MLflow, no global RNG.

@dataclass
class EDMTraining:
    """Everything one rank trains with. `net` may be DDP-wrapped; `ema` is a bare copy in eval mode."""
    cfg: EDMConfig
    net: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    label_dim: int
    device: torch.device
    rank: int = 0
    world: int = 1
    n_img: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    loss_fn: EDMLoss = field(init=False)

    def __post_init__(self) -> None:
        self.loss_fn = EDMLoss(self.cfg.p_mean, self.cfg.p_std, self.cfg.sigma_data)

    @property
    def per_worker_batch(self) -> int:
        return self.cfg.batch_size // self.world


def build_training(cfg: EDMConfig, label_dim: int, device: torch.device, rank: int = 0, world: int = 1,
                   prepare: Callable[[nn.Module], nn.Module] = lambda m: m) -> EDMTraining:
    """A fresh rank: the network built from `cfg.seed` (identical on every rank), its EMA, Adam, the rank's noise
    generator. `label_dim` is the dataset's class count (the net takes 0 when edm.conditional is false);
    `prepare` wraps the network for DDP (ray.train.torch.prepare_model) when world > 1."""
    if cfg.batch_size % world:
        raise ValueError(f"edm.batch_size: {cfg.batch_size} is not divisible by {world} workers")
    net = build_edm(cfg, label_dim=label_dim).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    net = prepare(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, **ADAM)
    generator = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, "noise", rank))
    return EDMTraining(cfg, net, ema, optimizer, generator, ema.label_dim, device, rank, world)


def batch_rows(step: int, num_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Rows of this rank's share of global batch `step`: epoch e is a permutation seeded by (seed, e) cut into
    num_rows // batch_size batches (the remainder sits out that epoch; a different one every epoch)."""
    per_epoch = num_rows // batch_size
    if per_epoch < 1:
        raise ValueError(f"edm.batch_size: {batch_size} is larger than the {num_rows} training images")
    epoch, index = divmod(step, per_epoch)
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(derived_seed(seed, "order", epoch)))
    share = batch_size // world
    start = index * batch_size + rank * share
    return perm[start:start + share].numpy()


def model_inputs(t: EDMTraining, images: np.ndarray, labels: np.ndarray
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """uint8 NHWC → float NCHW in [−1, 1] (optionally x-flipped), one-hot labels (None when unconditional) and
    all-zero augment labels (EDM's "not augmented"; they keep `map_augment` in the graph, which DDP requires)."""
    x = torch.as_tensor(images, device=t.device).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    if t.cfg.xflip:
        flip = torch.rand(x.shape[0], generator=t.generator, device=t.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    onehot = None
    if t.label_dim:
        onehot = torch.eye(t.label_dim, device=t.device)[torch.as_tensor(labels, device=t.device)]
    augment = torch.zeros(x.shape[0], t.cfg.augment_dim, device=t.device) if t.cfg.augment_dim else None
    return x, onehot, augment


def train_step(t: EDMTraining, images: np.ndarray, labels: np.ndarray) -> float:
    """One optimizer step on this rank's share; returns the mean per-element loss (EDM's `Loss/loss`)."""
    x, onehot, augment = model_inputs(t, images, labels)
    lr = lr_warmup(t.cfg.lr, t.n_img, t.cfg.warmup_kimg)  # from images seen *before* the step, as EDM
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    loss = t.loss_fn(t.net, x, t.generator, onehot, augment)
    t.optimizer.zero_grad(set_to_none=True)
    # Summed over pixels and images, divided by the per-worker batch (EDM training_loop); DDP averages ranks.
    loss.sum().mul(1.0 / t.per_worker_batch).backward()
    for p in t.net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
    t.optimizer.step()
    ema_update(t.ema, t.net, ema_beta(t.cfg.batch_size, t.n_img, t.cfg.ema_halflife_kimg, t.cfg.ema_rampup))
    t.n_img += t.cfg.batch_size
    return float(loss.detach().mean())


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·net on parameters (the shared EMA step); buffers are copied (EDM's are constant
    resampling filters)."""
    live = unwrap(net)
    blend(list(ema.parameters()), [p.detach() for p in live.parameters()], beta)
    blend(list(ema.buffers()), list(live.buffers()), 0.0)


def tick_bounds(n_img: int, cfg: EDMConfig) -> tuple[int, int]:
    """(tick index, image count at which it ends) for a tick starting at `n_img`: ticks end at the first step
    boundary past each multiple of checkpoint_every_kimg, and at total_kimg."""
    tick_img = cfg.checkpoint_every_kimg * 1000
    tick = int(n_img // tick_img)
    return tick, math.ceil(min((tick + 1) * tick_img, cfg.total_kimg * 1000))


def _rank_mean(total: float, count: int, world: int) -> float:
    """Mean over all ranks' steps (one all-reduce per tick; rank 0's report then speaks for every rank)."""
    values = torch.tensor([total, float(count)], dtype=torch.float64)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return float(values[0] / max(values[1], 1.0))


def run_tick(t: EDMTraining, train: ImageSet, before_step: Callable[[int], None] = lambda n_img: None
             ) -> dict[str, float]:
    """Train one tick (see the module docstring for its seeding); append and return its metrics."""
    tick, end = tick_bounds(t.n_img, t.cfg)
    t.generator.manual_seed(derived_seed(t.cfg.seed, "noise", t.rank, tick))
    start_img, start_time, losses = t.n_img, time.perf_counter(), []
    cuda = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(derived_seed(t.cfg.seed, "dropout", t.rank, tick))
        while t.n_img < end:
            before_step(t.n_img)
            rows = batch_rows(t.n_img // t.cfg.batch_size, len(train), t.cfg.batch_size, t.cfg.seed, t.rank, t.world)
            losses.append(train_step(t, train.images[rows], train.labels[rows]))
    seconds = time.perf_counter() - start_time
    metrics = {"tick": tick + 1, "kimg": t.n_img / 1000, "loss": _rank_mean(sum(losses), len(losses), t.world),
               "lr": t.optimizer.param_groups[0]["lr"],
               "sec_per_kimg": seconds / max((t.n_img - start_img) / 1000, 1e-9)}
    t.history.append(metrics)
    return metrics


def state_dict(t: EDMTraining) -> dict[str, Any]:
    return {"net": unwrap(t.net).state_dict(), "ema": t.ema.state_dict(), "optimizer": t.optimizer.state_dict(),
            "n_img": t.n_img, "history": list(t.history)}


def load_state(t: EDMTraining, state: dict[str, Any]) -> None:
    unwrap(t.net).load_state_dict(state["net"])
    t.ema.load_state_dict(state["ema"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.n_img, t.history = int(state["n_img"]), list(state["history"])


# ---------------------------------------------------------------------------------------------------------------
# The Ray Train worker (every rank runs it).

def _crash_drill(crash: Optional[dict], rank: int) -> Callable[[int], None]:
    """Fault-injection drill (tests, chaos runs): `crash = {"kimg", "marker"}` kills rank 0's process before the
    first step at or past `kimg`, once (the marker file lets the retried attempt run through)."""
    def before_step(n_img: int) -> None:
        if crash and rank == 0 and n_img >= crash["kimg"] * 1000 and not Path(crash["marker"]).exists():
            Path(crash["marker"]).write_text("crashed")
            os._exit(1)
    return before_step


def _worker_training(cfg: ExperimentConfig, label_dim: int) -> EDMTraining:
    import ray.train.torch

    from raylab.raytrain import rank_and_world

    rank, world = rank_and_world()
    prepare = ray.train.torch.prepare_model if world > 1 else (lambda m: m)
    return build_training(cfg.edm, label_dim, ray.train.torch.get_device(), rank, world, prepare)


def edm_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry: resume from the latest checkpoint if any, train tick by tick, then (rank 0) write the EMA
    network to `<run dir>/network` and a sample grid to `<run dir>/samples.png` and MLflow."""
    cfg = from_flat(loop_config["flat"])
    with torch_threads(cfg.resources.cpus_per_worker):
        return _train_ticks(cfg, loop_config)


def _train_ticks(cfg: ExperimentConfig, loop_config: dict[str, Any]) -> dict[str, Any]:
    from raylab.raytrain import load_latest_state, report, worker_preflight

    worker_preflight(cfg, loop_config)
    splits = load_splits(cfg.data)
    t = _worker_training(cfg, splits.num_classes)
    state, _ = load_latest_state()
    if state is not None:
        load_state(t, state)
    drill = _crash_drill(loop_config.get("crash"), t.rank)
    while t.n_img < cfg.edm.total_kimg * 1000:
        metrics = run_tick(t, splits.train, drill)
        report(metrics, state_dict(t))
    if t.rank == 0:
        finish(t, cfg, Path(loop_config["run_dir"]), int(loop_config.get("samples_per_class", 10)))
    return {"history": t.history, "n_img": t.n_img}


def finish(t: EDMTraining, cfg: ExperimentConfig, run_path: Path, per_class: int) -> None:
    """Rank 0, after the last tick: the EMA network (save_edm) and a grid of its samples, one row per class."""
    from raylab.generate.sample_local import sample_images, write_grid_png

    last = t.history[-1] if t.history else {}
    save_edm(run_path / NETWORK_DIR, t.ema, extra={"dataset": cfg.data.dataset, "kimg": t.n_img / 1000,
                                                   "loss": last.get("loss"), "edm_seed": cfg.edm.seed})
    rows = max(t.label_dim, 1)
    images, _ = sample_images(t.ema, rows * per_class, sample_kwargs(cfg.generate), seed=cfg.generate.seed,
                              device=t.device)
    write_grid_png(run_path / SAMPLES_PNG, images, per_class)  # the driver logs it to MLflow


# ---------------------------------------------------------------------------------------------------------------
# The driver.

@dataclass(frozen=True)
class EDMTrainOutcome:
    run_dir: Path
    network_dir: Path
    mlflow_run_id: Optional[str]
    history: list[dict[str, float]]

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan


def check_inputs(cfg: ExperimentConfig) -> None:
    """What can be checked before Ray starts beyond the config itself: the data set's files are there and intact.
    (The batch split over the workers is an `ExperimentConfig` rule, so no config reaching here can break it.)"""
    check_dataset(cfg.data)


def train_edm(cfg: ExperimentConfig, *, name: Optional[str] = None, parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None, callbacks: Optional[list] = None, crash: Optional[dict] = None,
              samples_per_class: int = 10) -> EDMTrainOutcome:
    """Train the EDM of `cfg.edm` on `cfg.data` with Ray Train (`cfg.resources`); rerunning the same config resumes
    its run (deterministic run name). `crash`: the fault drill of `_crash_drill` (tests)."""
    check_inputs(cfg)
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class: {samples_per_class} must be >= 1")
    from raylab.raytrain import EpochLogger, make_trainer
    from raylab.runs import run_dir
    from raylab.train.job import open_tracker  # the adversarial driver's: reopens the run dir's MLflow run

    run = run_dir(cfg, "edm", name)
    tracker = open_tracker(cfg, run, parent_run_id, tags)
    loop_config = {"flat": to_flat(cfg), "run_dir": str(run.path), "crash": crash,
                   "samples_per_class": samples_per_class}
    ticks = math.ceil(cfg.edm.total_kimg / cfg.edm.checkpoint_every_kimg)
    logger = EpochLogger(tracker.uri, tracker.run_id, "tick", ticks, label=f"[{run.name}] ")
    trainer = make_trainer(edm_worker, loop_config, cfg, run, callbacks=[logger, *(callbacks or [])])
    with tracker:
        out = trainer.fit().return_value or {}
        logger.replay(out.get("history", []))  # local mode has no controller; elsewhere every step is there
        tracker.set_tags({"edm.network_dir": str(run.path / NETWORK_DIR)})
        if (run.path / SAMPLES_PNG).exists():
            tracker.log_artifact(run.path / SAMPLES_PNG, "plots")
    return EDMTrainOutcome(run.path, run.path / NETWORK_DIR, tracker.run_id, list(out.get("history", [])))
