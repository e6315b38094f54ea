"""The driver of adversarial training: check everything, then one `TorchTrainer.fit()`.

`run_training(cfg, generated=...)` validates the inputs before any compute (config, dataset, generated view),
resolves the deterministic run directory (`raylab.runs`: the config and the content identities of the original
split and the generated view, so rerunning the same inputs resumes it and another view is another run), opens or
reopens the MLflow run, and passes the generated view's row index to the workers, which stream its rows through
Ray Data (`raylab.train.ingest`) in a per-pass random order common to all ranks (`raylab.data.mix`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylab.config import ExperimentConfig, to_flat, to_json
from raylab.data.datasets import check_dataset, split_identity
from raylab.data.mix import split_batch
from raylab.precision import precision_params
from raylab.preempt import Preempted, stop_file, stop_line
from raylab.raytrain import EpochLogger, make_trainer
from raylab.runs import RunDir, run_dir
from raylab.train.worker import train_worker

if TYPE_CHECKING:
    from raylab.pipeline.generated_input import GeneratedInput

MLFLOW_RUN_FILE = "mlflow_run_id"
COST_FILE = "cost_device_s"  # device-seconds of every attempt at this run so far (a resumed run adds to it)


@dataclass(frozen=True)
class TrainOutcome:
    run: RunDir
    history: list[dict[str, Any]]
    best: dict[str, Any]
    mlflow_run_id: str | None
    device_s: float = 0.0  # the cost ledger: wall time of fit() x devices (workers), summed over attempts

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def _check_inputs(cfg: ExperimentConfig, generated: GeneratedInput | None) -> None:
    check_dataset(cfg.data)
    if cfg.train.ratio < 1.0 and generated is None:
        raise ValueError(f"train.ratio: {cfg.train.ratio} < 1 mixes in generated images, but no generated view "
                         "was given (generate one, or set train.ratio=1 to train on original images only)")
    world = max(cfg.resources.num_workers, 1)
    need = split_batch(cfg.train.batch_size // world, cfg.train.ratio)[1] * world
    if generated is not None and len(generated.rows) < need:  # else every worker fails, max_failures times over
        raise ValueError(f"the generated view has {len(generated.rows)} rows, fewer than one batch's {need} "
                         f"(train.batch_size={cfg.train.batch_size}, train.ratio={cfg.train.ratio}): keep more "
                         "images (generate.per_class, select.*) or lower the batch")


def open_tracker(cfg: ExperimentConfig, run: RunDir, parent_run_id: str | None, tags: dict | None,
                 run_name: str | None = None):
    """The run's MLflow run: reopened when this run directory already has one (a resumed run keeps its history).
    `run_name` (default: the run directory's name) is what the UI lists, e.g. a sweep trial's `steps=8`."""
    from raylab.tracking import Tracker, resolve_tracking_uri

    id_file = run.path / MLFLOW_RUN_FILE
    if id_file.exists():
        return Tracker.resume(resolve_tracking_uri(cfg.tracking), id_file.read_text().strip())
    tags = {"raylab.stage": run.stage, "raylab.run_dir": str(run.path),
            **{f"raylab.input.{k}": v for k, v in run.inputs.items()}, **(tags or {})}  # inputs: what names it
    tracker = Tracker.start(cfg.tracking, run_name or run.name, params={**to_flat(cfg), **precision_params(cfg)},
                            config_json=to_json(cfg), parent_run_id=parent_run_id, tags=tags)
    id_file.write_text(tracker.run_id)
    return tracker


def log_inputs(tracker: Any, cfg: ExperimentConfig, original: tuple[str, int],
               generated: GeneratedInput | None) -> None:
    """`mlflow.log_input` lineage: the original dataset (`original`: content hash of the training split as loaded,
    rows) and, when given, the generated view with its store and scorer (raylab.pipeline.select.generated_lineage)."""
    identity, rows = original
    tracker.log_dataset_lineage(identity, "original", f"{cfg.data.root}/{cfg.data.dataset}", rows,
                                extra={"dataset": cfg.data.dataset, "max_train": cfg.data.max_train,
                                       "val_size": cfg.data.val_size})
    if generated is not None:
        tracker.log_dataset_lineage(**generated.lineage)


def log_model(run_path: Path, tracker: Any) -> None:
    """The model in MLflow, so MLflow alone gives it back: the EMA `best.pt`/`last.pt` under `checkpoints/` and,
    for WideResNets, the RobustBench export with its model-info JSON under `robustbench/`."""
    for name in ("best.pt", "last.pt"):
        if (run_path / name).is_file():
            tracker.log_artifact(run_path / name, "checkpoints")
    log_model_info(run_path, tracker, weights=True)


def log_model_info(run_path: Path, tracker: Any, weights: bool = False) -> None:
    """The RobustBench export (`weights`) and its model-info JSON (refreshed after an evaluation)."""
    import tempfile

    from raylab.eval.export import EXPORT_NAME, INFO_NAME, export_robustbench, write_model_info

    if not (run_path / "best.pt").is_file() or not export_robustbench_supported(run_path):
        return
    with tempfile.TemporaryDirectory(prefix="raylab-export-") as tmp:
        if weights:
            tracker.log_artifact(export_robustbench(run_path, Path(tmp) / EXPORT_NAME), "robustbench")
        tracker.log_artifact(write_model_info(run_path, Path(tmp) / INFO_NAME), "robustbench")


def export_robustbench_supported(run_path: Path) -> bool:
    from raylab.config import from_json

    return from_json((run_path / "config.json").read_text()).model.name.startswith("wrn-")


def run_training(cfg: ExperimentConfig, *, generated: GeneratedInput | None = None, name: str | None = None,
                 prefix: str | None = None, parent_run_id: str | None = None, tags: dict | None = None,
                 callbacks: list | None = None, stage: str = "train", crash: dict | None = None,
                 trace: str | None = None, run_name: str | None = None) -> TrainOutcome:
    """Train `cfg` on Ray Train. `generated`: the generated view (`pipeline.select.generated_input`; None when
    ratio is 1); `name`: the run directory's name instead of `<prefix or stage>-<run identity>` (raylab.runs);
    `crash`: the worker's fault-injection drill (raylab.train.worker._fault_drill); `trace`: a directory where
    every rank records the generated rows of each batch (tests, `data mix-stats`)."""
    _check_inputs(cfg, generated)
    if cfg.data.val_size == 0:
        print("data.val_size=0: no validation set, so best.pt is the last epoch's weights (never chosen by test "
              "accuracy)", flush=True)
    original = split_identity(cfg.data)  # seconds at CIFAR-10 scale; the workers load the same split again
    run = run_dir(cfg, stage, name, prefix=prefix, inputs={"original": original[0], **_input_identities(generated)})
    tracker = open_tracker(cfg, run, parent_run_id, tags, run_name)
    log_inputs(tracker, cfg, original, generated)
    loop_config = {"flat": to_flat(cfg), "run_dir": str(run.path), "crash": crash, "trace": trace,
                   "generated": generated.rows if generated is not None else None,
                   "stop_file": str(stop_file() or "") or None}  # workers look for the stop request (preempt)
    logger = EpochLogger(tracker.uri, tracker.run_id, "epoch", cfg.train.epochs, label=f"[{run_name or run.name}] ")
    trainer = make_trainer(train_worker, loop_config, cfg, run, callbacks=[logger, *(callbacks or [])])
    with tracker:
        start = time.perf_counter()
        result = trainer.fit()
        device_s = _add_cost(run, (time.perf_counter() - start) * max(cfg.resources.num_workers, 1))
        out = result.return_value or {}
        logger.replay(out.get("history", []))  # local mode has no controller; elsewhere every step is there
        if out.get("stopped") is not None:  # the tracker ends the run KILLED; a rerun reopens it
            raise Preempted(stop_line(f"{run.name}: epoch {out['stopped']} of {cfg.train.epochs} checkpointed"))
        best = out.get("best", {})
        tracker.log_metrics({"best_epoch": best.get("epoch", -1), f"best_{best.get('metric', 'score')}":
                             best.get("score", float("nan")), "cost_train_device_s": device_s}, step=cfg.train.epochs)
        log_model(run.path, tracker)
    return TrainOutcome(run, out.get("history", []), best, tracker.run_id, device_s)


def _input_identities(generated: GeneratedInput | None) -> dict[str, str]:
    """The generated view's parts of the run identity; "none" when training on original images only."""
    return generated.identities() if generated is not None else {"generated": "none", "scorer": "none"}


def _add_cost(run: RunDir, seconds: float) -> float:
    from raylab.io import atomic_write_text

    path = run.path / COST_FILE
    total = (float(path.read_text()) if path.is_file() else 0.0) + seconds
    atomic_write_text(path, f"{total}\n")
    return total


def checkpoint_path(run_path: str | Path, which: str = "best") -> Path:
    return Path(run_path) / f"{which}.pt"


# Digit datasets crop without flipping: a mirrored digit is not a digit of its class (a mirrored 2 reads as a 5).
# Natural-image datasets keep the standard pad & crop & flip of He et al. 2016.
SCORER_AUGMENT: dict[str, str] = {"digits": "crop", "svhn": "crop"}
SCORER_DEFAULT_AUGMENT = "crop_flip"


def scorer_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The standard (non-robust) classifier that scores and pseudo-labels generated images: plain CE on original
    images only (Wang et al. 2023 App. A: "standardly trained" WRN-28-10, 96.15% on CIFAR-10; Rebuffi et al. 2021
    App. D / Carmon et al. 2019: a classifier trained on clean training data labels the generated images).

    `train.label_smoothing` is 0, not the adversarial recipe's 0.1 (Wang et al. 2023 Table 8): smoothing s makes
    the optimal softmax confidence 1 - s (K - 1) / K (0.91 for s = 0.1, K = 10), which squeezes the scores that
    top-k selection ranks and makes the two-classifier agreement filter's 90% confidence threshold (Sehwag et al.
    2022 §3.3.1) almost meaningless. `train.augment` comes from SCORER_AUGMENT (no flips for digits)."""
    from raylab.config import override

    augment = SCORER_AUGMENT.get(cfg.data.dataset, SCORER_DEFAULT_AUGMENT)
    return override(cfg, {"model.name": cfg.select.scorer_model, "train.loss": "ce", "train.ratio": 1.0,
                          "train.label_smoothing": 0.0, "train.augment": augment})


def run_scorer_training(cfg: ExperimentConfig, **kwargs: Any) -> TrainOutcome:
    return run_training(scorer_config(cfg), stage="scorer", **kwargs)
