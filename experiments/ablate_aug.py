"""Data augmentation with generated data (000_... Table 9; 001_... Cutout/CutMix/MixUp comparison)."""
from raylab.tune.experiment import PAPER_1M, Ablation, run_ablation

ABLATION = Ablation(
    key="train.augment", title="augmentation ablation (000_... Table 9, 001_...)",
    values={"default": ["none", "crop_flip", "cutmix"], "smoke": ["none"],
            "paper": ["none", "crop_flip", "cutout", "cutmix", "mixup"]},
    overrides={"paper": PAPER_1M},
)

if __name__ == "__main__":
    raise SystemExit(run_ablation(ABLATION))
