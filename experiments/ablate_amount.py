"""Amount of generated data vs robustness and robust overfitting (Wang et al. 2023 Table 5, Figure 2).

Every amount is a balanced per-class prefix of one selected view, so the sweep generates once."""
from raylab.tune.experiment import Ablation, run_ablation

ABLATION = Ablation(
    key="select.amount", title="generated-data amount ablation (Wang et al. 2023 Table 5)", layout="best_last",
    values={"tiny": [100, 200, 300], "smoke": [40],
            "paper": [50_000, 100_000, 200_000, 500_000, 1_000_000, 5_000_000, 10_000_000, 20_000_000]},
    # Table 5: 0.2 ratio above 1M is the paper's choice; the selection keeps everything at large amounts.
    overrides={"paper": {"generate.per_class": 2_000_000, "select.policy": "none", "train.ratio": 0.2}},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
