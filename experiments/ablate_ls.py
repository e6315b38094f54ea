"""Label smoothing in TRADES (Wang et al. 2023 Table 8, middle)."""
from raylab.tune.experiment import Ablation, run_ablation

ABLATION = Ablation(
    key="train.label_smoothing", title="label smoothing ablation (Wang et al. 2023 Table 8 middle)",
    values={"tiny": [0.0, 0.1, 0.2], "smoke": [0.0], "paper": [0.0, 0.1, 0.2, 0.3, 0.4]},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
