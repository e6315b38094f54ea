"""TRADES beta (Wang et al. 2023 Table 8, right)."""
from raylab.tune.experiment import Ablation, run_ablation

ABLATION = Ablation(
    key="train.beta", title="TRADES beta ablation (Wang et al. 2023 Table 8 right)",
    values={"tiny": [2.0, 5.0, 8.0], "smoke": [2.0], "paper": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
