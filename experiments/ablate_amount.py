"""Amount of generated data vs robustness and robust overfitting (Wang et al. 2023 Table 5, Figure 2).

Every amount is a balanced per-class prefix of one generation, so the sweep generates once."""
from raylab.tune.experiment import Ablation, run_ablation


def paper_rule(amount):
    """Wang et al. 2023 §4.1: top 20% by score and ratio 0.3 up to 1M; above, every image and ratio 0.2."""
    small = int(amount) <= 1_000_000
    return {"select.policy": "topk" if small else "none", "train.ratio": 0.3 if small else 0.2}


ABLATION = Ablation(
    key="select.amount", title="generated-data amount ablation (Wang et al. 2023 Table 5)", layout="best_last",
    values={"tiny": [100, 200, 300], "smoke": [40],
            "paper": [50_000, 100_000, 200_000, 500_000, 1_000_000, 5_000_000, 10_000_000, 20_000_000]},
    # 20M: the largest amount, unselected. Tiny: robust overfitting needs a small original set trained long.
    overrides={"paper": {"generate.per_class": 2_000_000}, "tiny": {"data.max_train": 256, "train.epochs": 32}},
    coupled={"paper": paper_rule},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
