"""`raylab plan` and `ablate_*.py --plan`: the arithmetic of a plan, against the figures it is built from."""
import runpy
from pathlib import Path

import pytest

from raylab import cli
from raylab.presets import make_config
from raylab.knobs import ConfigError
from raylab.cost import TRAIN_IMG_PER_S, aa_passes, make_plan, plan_arm, validation_s

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def stages(cfg):
    return {s.stage: s for s in plan_arm(cfg)}


def test_paper_generation_and_training_reproduce_the_published_a100_times():
    """Wang et al. 2023 Table 10: 5M images at 20 steps on 4 A100 in 10.92 h (43.7 device-h); App. B.2: a
    WRN-28-10 epoch of 51,200 images at batch 2048 on 4 A100 in 3.45 min."""
    cfg = make_config("paper", {"select.policy": "none", "select.scorer_checkpoint": "none"})
    gen = stages(cfg)["generate"]
    assert (gen.images, gen.shards) == (5_000_000, 500)
    assert gen.device_s / 3600 == pytest.approx(10.92 * 4, rel=0.005)
    epoch = make_config("paper", {"train.batch_size": 2048, "train.epochs": 1, "train.ratio": 1.0,
                                  "data.val_size": 0, "eval.autoattack": "none"})
    train = stages(epoch)["train"]
    assert train.steps == 25  # ceil(50,000 / 2048): the reference's CIFAR-sized epoch
    assert train.device_s / 60 == pytest.approx(3.45 * 4, rel=0.01)


def test_validation_is_split_over_the_workers_and_every_held_device_is_counted():
    """Issue 24. At batch 2048 on 32 A100 a WRN-28-10 epoch is 51,200 x 12 / 32 = 19,200 passes per device; the
    epoch's validation (PGD-40 of 1,024 images, 41 passes each, and a clean forward over the 10,000 test images) is
    43,317 passes: on one device it outlasted the training. Each of the 32 devices now validates 32 + 313 images,
    and all 32 are held until the largest share is done."""
    pass_s = 1 / (TRAIN_IMG_PER_S["wrn-28-10"] * 12)  # one forward-backward pass of one image on one A100
    one, many = (make_config("paper", {"train.batch_size": 2048, "train.epochs": 1, "train.ratio": 1.0,
                                       "resources.num_workers": workers}) for workers in (1, 32))
    assert validation_s(one, 1024) == pytest.approx((1024 * 41 + 10_000 / 3) * pass_s)
    assert validation_s(many, 1024) == pytest.approx(32 * (32 * 41 + 313 / 3) * pass_s)
    training_per_device = 25 * 2048 * 12 / 32 * pass_s
    assert validation_s(many, 1024) / 32 < training_per_device < validation_s(one, 1024)
    train = stages(many)["train"]
    assert train.device_s == pytest.approx(train.images * 12 * pass_s + validation_s(many, 1024))
    assert "validation 7% (est.): PGD-40 of 1,024 + clean 10,000 test images per epoch over 32 devices" in train.note
    assert validation_s(make_config("paper", {"train.epochs": 1, "data.val_size": 0}), 0) > 0  # the test pass stays


def test_the_amount_sweep_generates_once_and_counts_it_once(capsys):
    ab = runpy.run_path(str(EXPERIMENTS / "ablate_amount.py"), run_name="not_main")["ABLATION"]
    from raylab.tune.experiment import run_ablation

    assert run_ablation(ab, ["--preset", "paper", "--plan"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("plan: 8 arm(s)") and out[-1].startswith("total, shared artifacts once:")
    generations = [line for line in out if line.strip().startswith("generate")]
    assert len(generations) == 8 and all("20,000,000 images" in g and "[shared by 8 arms]" in g for g in generations)
    kept = [line.split()[1] for line in out if line.strip().startswith("select")]
    assert kept == ["50,000", "100,000", "200,000", "500,000", "1,000,000", "5,000,000", "10,000,000", "20,000,000"]
    assert "(top 20% per class)" in out[3] and any("(none)" in line for line in out)  # the paper's rule per amount


def test_a_sweep_total_counts_shared_artifacts_once_and_overrides_apply():
    cfg = make_config("paper")
    plan = make_plan(cfg, {"train.beta": ["2", "5", "8"]})
    unique = plan.unique()
    assert sorted(s.stage for s in unique.values()) == ["eval"] * 3 + ["generate", "select"] + ["train"] * 3
    assert plan.total_s() == pytest.approx(sum(s.device_s for s in unique.values()))
    faster = make_plan(make_config("paper", {"cost.train_img_per_s": 2 * TRAIN_IMG_PER_S["wrn-28-10"]}))
    base = make_plan(cfg)
    assert faster.total_s("train") == pytest.approx(base.total_s("train") / 2)
    unknown = make_plan(make_config("paper", {"model.name": "resnet18"}))
    assert unknown.total_s() is None and "set cost.train_img_per_s" in "\n".join(unknown.lines())


def test_plan_verb_prints_each_stage_and_the_total(capsys):
    assert cli.main(["plan", "--preset", "paper", "--set", "data.dataset=cifar100",
                     "--sweep", "generate.steps=20,25"]) == 0
    out = capsys.readouterr().out
    assert "5,000,000 images" in out  # CIFAR-100: 50K per class x 100 classes, not 50M
    assert out.count("[shared by 2 arms]") == 0 and out.strip().splitlines()[-1].startswith("total")


def test_the_ledger_divides_measured_device_time_by_what_it_bought():
    from raylab.cost import ledger

    got = ledger(generate_s=100.0, kept=50, train_s=300.0, eval_s=100.0, robust_acc=0.25)
    assert got["cost_total_device_s"] == 500.0 and got["cost_per_kept_image_s"] == 2.0
    assert got["cost_per_robust_point_s"] == 20.0  # 500 device-s for 25 points of robust accuracy
    assert ledger(0.0, 0, 1.0, 1.0, 0.0)["cost_per_robust_point_s"] != ledger(0.0, 0, 1.0, 1.0, 0.0)[
        "cost_per_robust_point_s"]  # nan: no robust accuracy bought, no price per point


def test_the_custom_autoattack_is_costed_at_its_budget():
    """The custom version's passes follow eval.aa_*: the tiny preset's 25 it / 1 restart / 3 targets APGD-CE + APGD-T
    is 25 + 0.6 x 75 passes per image, the library's custom budget (100 / 5 / 9) 500 + 0.6 x 900."""
    tiny = make_config("tiny").eval
    assert aa_passes(tiny) == pytest.approx(25 + 0.6 * 75)
    library = make_config("tiny", {"eval.aa_iters": 100, "eval.aa_restarts": 5, "eval.aa_target_classes": 9}).eval
    assert aa_passes(library) == pytest.approx(500 + 0.6 * 900)
    alone = make_config("tiny", {"eval.aa_attacks": "apgd-ce"}).eval
    assert aa_passes(alone) == pytest.approx(25)
    assert aa_passes(make_config("paper").eval) == pytest.approx(100 + 0.6 * (900 + 900 + 5000 / 3))
    cheap, dear = (stages(make_config("paper", {"eval.autoattack": "custom", **budget}))["eval"].device_s
                   for budget in ({"eval.aa_iters": 10}, {"eval.aa_iters": 100}))
    assert cheap < dear
    with pytest.raises(ConfigError, match="eval.aa_attacks"):
        aa_passes(make_config("tiny", {"eval.aa_attacks": "apgd-ce,pgd"}).eval)
