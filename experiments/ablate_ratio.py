"""Original-to-generated mixing ratio (Wang et al. 2023 Figure 3 and Table 9: 0.3 at 1M, 0.2 above; Rebuffi et al.
2021 Figure 7)."""
from raylab.tune.experiment import Ablation, run_ablation

ABLATION = Ablation(
    key="train.ratio", title="mixing ratio ablation (Wang et al. 2023 Figure 3; original fraction of every batch)",
    values={"tiny": [0.2, 0.5, 1.0], "smoke": [1.0], "paper": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
