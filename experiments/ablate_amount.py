"""Amount of generated data vs robustness and robust overfitting (Wang et al. 2023 Table 5, Figure 2).

Every amount is a balanced per-class prefix of one generation, so the sweep generates once."""
from raylab.amounts import ONE_MILLION, paper_ratio
from raylab.tune.experiment import Ablation, run_ablation


def paper_rule(amount):
    """Wang et al. 2023 §3 / App. A: the top 20% by score up to 1M images, every image above; the ratio follows
    the amount (0.3 up to 1M, 0.2 above). SVHN keeps its own `select.policy=none` (raylab.presets)."""
    return {"select.policy": "topk" if int(amount) <= ONE_MILLION else "none", "train.ratio": paper_ratio(int(amount))}


ABLATION = Ablation(
    key="select.amount", title="generated-data amount ablation (Wang et al. 2023 Table 5)", layout="best_last",
    values={"tiny": [100, 200, 300], "smoke": [40],
            "paper": [50_000, 100_000, 200_000, 500_000, 1_000_000, 5_000_000, 10_000_000, 20_000_000]},
    # One CIFAR-10 generation of 20M covers every amount (Table 5 without its 50M row). CIFAR-100 and SVHN generate
    # their own sets (5M, 1M): the amounts beyond them are left out. Tiny: robust overfitting needs a small original
    # set trained long.
    overrides={"paper": {"generate.per_class": 2_000_000}, "tiny": {"data.max_train": 256, "train.epochs": 32}},
    coupled={"paper": paper_rule},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
