"""EDM sampling steps vs robustness (Wang et al. 2023 Table 7: Step | FD | Clean | PGD-40 | AA). The main job."""
from raylab.tune.experiment import MAIN_JOB, Ablation, run_ablation

ABLATION = Ablation(
    key="generate.steps", title="EDM sampling steps ablation (Wang et al. 2023 Table 7)", layout="steps",
    values={"tiny": [2, 4, 8], "smoke": [2, 4], "paper": [5, 10, 15, 20, 25, 30, 35, 40]},
    # Table 7: WRN-28-10 on 1M generated images (top 20% of 5M), 400 epochs, batch 512, ratio 0.3: the paper
    # preset as it is. The default fits the main job's 10-minute budget on 2 CPU cores: 3 trials of WRN-10-1.
    overrides={"tiny": MAIN_JOB},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
