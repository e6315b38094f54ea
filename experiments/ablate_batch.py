"""Batch size with sufficient generated data (Wang et al. 2023 Table 8, left: 5M images)."""
from raylab.tune.experiment import Ablation, run_ablation

ABLATION = Ablation(
    key="train.batch_size", title="batch size ablation (Wang et al. 2023 Table 8 left)",
    values={"tiny": [32, 64], "smoke": [16], "paper": [128, 256, 512, 1024, 2048]},
    overrides={"paper": {"generate.per_class": 500_000, "select.policy": "none"}},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
