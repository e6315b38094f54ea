"""Data augmentation with generated data (Wang et al. 2023 §5.3 Table 6; Rebuffi et al. 2021 Cutout/CutMix/MixUp)."""
from raylab.tune.experiment import Ablation, run_ablation

ABLATION = Ablation(
    key="train.augment", title="augmentation ablation (Wang et al. 2023 Table 6, Rebuffi et al. 2021)",
    values={"tiny": ["none", "crop", "cutmix"], "smoke": ["none"],
            "paper": ["none", "crop_flip", "cutout", "cutmix", "mixup"]},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
