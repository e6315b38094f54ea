"""The cluster's contract, checked on what a rehearsed job left behind (after the nodes are gone):

- every trial's per-epoch metrics are in the head's MLflow exactly once (none twice, none missing);
- shards, views, checkpoints and the Ray Train/Tune storage exist under the shared root;
- nothing a later stage needs is on a node's private disk (Ray's own code cache and logs aside).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EPOCH_METRIC = "train_loss"
# What a later stage reads: shards and manifests, views, Train checkpoints and weights, Tune/Train storage, MLflow.
OUTPUT_PATTERNS = ("*.parquet", "manifest.json", "view.json", "rows.npz", "checkpoint_*", "best.pt", "last.pt",
                   "state.pt", "ray_results", "experiment_state-*.json", "mlflow.db", "mlartifacts")
# Ray's per-node caches: the job's code (working_dir, carrying raylab's committed assets), session logs, and Tune's
# driver-side staging copy of its experiment state (synced to the storage_path on the shared root, read from there).
NODE_CACHES = ("runtime_resources", "logs", "driver_artifacts")


@dataclass(frozen=True)
class TrialEpochs:
    name: str
    epochs: int           # train.epochs of the trial
    steps: list[int]      # every logged step of the epoch metric, duplicates included

    @property
    def twice(self) -> int:
        return len(self.steps) - len(set(self.steps))

    @property
    def lost(self) -> int:
        return len(set(range(1, self.epochs + 1)) - set(self.steps))


def trial_epochs(uri: str, experiment: str) -> list[TrialEpochs]:
    """Every training run of a sweep trial in the store: its logged epoch steps."""
    from raylab.tracking import TrackingError, find_runs, get_run_metrics_history

    try:
        runs = find_runs(uri, experiment, "tags.`raylab.stage` = 'train'")
    except TrackingError:  # the job never got as far as its experiment
        return []
    return [TrialEpochs(r.name, int(r.params.get("train.epochs", 0)),
                        [step for step, _ in get_run_metrics_history(uri, r.run_id, EPOCH_METRIC)]) for r in runs]


def _ignored(path: Path, root: Path) -> bool:
    return any(part in NODE_CACHES for part in path.relative_to(root).parts)


def outputs_under(root: Path) -> list[Path]:
    """Stage outputs under `root` (OUTPUT_PATTERNS), outside Ray's caches."""
    found = {p for pattern in OUTPUT_PATTERNS for p in root.rglob(pattern)}
    return sorted(p for p in found if not _ignored(p, root))


def shared_outputs(shared: Path) -> dict[str, int]:
    """How many of each kind of output the shared root holds."""
    outputs = outputs_under(shared)
    count = lambda *names: sum(any(p.match(n) for n in names) for p in outputs)  # noqa: E731
    return {"shards": count("*.parquet"), "views": count("view.json"), "checkpoints": count("checkpoint_*"),
            "ray storage": int((shared / "runs" / "ray_results").is_dir()) + int((shared / "runs" / "tune").is_dir())}


def stray_outputs(private_disks: list[Path]) -> list[Path]:
    """Outputs a later stage needs that a node left on its private disk (it would be lost with the node)."""
    return [p for disk in private_disks if disk.exists() for p in outputs_under(disk)]


def contract_lines(trials: list[TrialEpochs], shared: dict[str, int], strays: list[Path],
                   expect_trials: int | None) -> list[str]:
    """One line per broken rule (none when the contract holds)."""
    problems = [f"MLflow: trial {t.name}: {t.twice} epoch(s) logged twice, {t.lost} missing"
                for t in trials if t.twice or t.lost]
    if not trials or (expect_trials is not None and len(trials) != expect_trials):
        problems.append(f"MLflow: {len(trials)} trial run(s) in the head's store, expected {expect_trials or '>= 1'}")
    problems += [f"shared root: no {kind}" for kind, n in shared.items() if n == 0]
    problems += [f"private disk: {p} (a later stage needs it on the shared root)" for p in strays[:10]]
    return problems
