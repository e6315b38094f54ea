"""Training epochs and early stopping with sufficient generated data (Wang et al. 2023 Table 4)."""
from raylab.tune.experiment import Ablation, run_ablation

ABLATION = Ablation(
    key="train.epochs", title="epochs ablation (Wang et al. 2023 Table 4)", layout="best_last",
    values={"tiny": [4, 8, 16], "smoke": [1], "paper": [400, 800, 1200, 1600, 2000, 2400]},
    # Table 4: 20M unselected images at batch 2048 (ratio 0.2, the paper preset's rule above 1M).
    overrides={"paper": {"generate.per_class": 2_000_000, "select.policy": "none", "train.batch_size": 2048}},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
