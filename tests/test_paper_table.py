"""The paper configuration, written down from the papers and checked against what `--plan` prints.

Every experiment x {cifar10, cifar100, svhn}: per arm, the images generated and kept, the selection, the sampler
steps, the batch, the epochs, the ratio and the training attack. W = Wang et al. 2023 (papers/000_*), R = the
reference implementation (reference/training_recipe.md). The ablation tables are CIFAR-10 tables; on another dataset
the dataset's own generated set replaces CIFAR-10's (the issue's rule: per-dataset values win over an ablation's
defaults unless it sweeps the key).
"""
import re
import runpy
from pathlib import Path

import pytest

from raylab.config import to_flat
from raylab.presets import make_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
M = 1_000_000

# Each dataset's standard generated set: (generated, sampler steps, selection).
STANDARD = {
    "cifar10": (5 * M, 20, "topk"),    # W §3: 1M selected from 5M, top 20% per class; W Table 7: 20 steps
    "cifar100": (5 * M, 25, "topk"),   # W App. A: 50K per class, top 20%; W §5.4 / Table 11: 25 steps (FID 2.09)
    "svhn": (1 * M, 25, "none"),       # R §2: the published SVHN 1M set, never filtered; 25 steps (R's README)
}
# The training attack everywhere: TRADES, L-inf PGD-10, eps 8/255, step 2/255 (W §3; R §1).
ATTACK = "trades, linf PGD-10 eps 8/255 step 2/255"
BATCH, EPOCHS = 512, 400  # W §5 ("400 epochs, with a batch size of 512 and ... ratio of 0.3") and §6


def ratio(kept):
    return 0.3 if kept <= M else 0.2  # W §3: 0.3 for 1M generated images, 0.2 above (App. B.1, Table 9)


def arm(generated, kept, selection, steps, batch=BATCH, epochs=EPOCHS, mix=None):
    return {"generated": generated, "kept": kept, "selection": selection if kept else None, "steps": steps,
            "batch": batch, "epochs": epochs, "ratio": ratio(kept) if mix is None else mix}


def standard(dataset, **kw):
    generated, steps, selection = STANDARD[dataset]
    kept = generated // 5 if selection == "topk" else generated  # top 20%
    return arm(generated, kept, selection, kw.pop("steps", steps), **kw)


def largest(dataset, amount, **kw):
    """An experiment on more than the standard 1M (W Table 4: 20M; Table 8 left: 5M), unselected (W §3). Another
    dataset brings its own generation, as far as it goes."""
    generated = amount if dataset == "cifar10" else STANDARD[dataset][0]
    return arm(generated, generated, "none", STANDARD[dataset][1], **kw)


def amount_arm(dataset, amount):
    """W Table 5: one generation for every amount (20M for CIFAR-10), top 20% up to 1M, everything above (W §3)."""
    generated = 20 * M if dataset == "cifar10" else STANDARD[dataset][0]
    filtered = STANDARD[dataset][2] == "topk" and amount <= M
    return arm(generated, amount, "topk" if filtered else "none", STANDARD[dataset][1])


AMOUNTS = [50_000, 100_000, 200_000, 500_000, M, 5 * M, 10 * M, 20 * M]  # W Table 5 (without x and 50M)
EXPECTED = {
    # W Table 7: 5 to 40 steps, 1M images.
    "steps": lambda d: {f"steps={s}": standard(d, steps=s) for s in range(5, 41, 5)},
    "amount": lambda d: {f"amount={a}": amount_arm(d, a) for a in AMOUNTS if a <= STANDARD[d][0] or d == "cifar10"},
    # W Table 4: 400 to 2400 epochs on 20M images, batch 2048, ratio 0.2.
    "epochs": lambda d: {f"epochs={e}": largest(d, 20 * M, batch=2048, epochs=e)
                         for e in (400, 800, 1200, 1600, 2000, 2400)},
    # W Table 8 left: batch 128 to 2048 on 5M images.
    "batch": lambda d: {f"batch_size={b}": largest(d, 5 * M, batch=b) for b in (128, 256, 512, 1024, 2048)},
    # W Table 8 right and middle: beta 2 to 8, label smoothing 0 to 0.4, 1M images.
    "beta": lambda d: {f"beta={b:.1f}": standard(d) for b in range(2, 9)},
    "ls": lambda d: {f"label_smoothing={s}": standard(d) for s in (0.0, 0.1, 0.2, 0.3, 0.4)},
    # W Figure 3 (original fraction of every batch, 1M images); 1.0 trains on originals only.
    "ratio": lambda d: {f"ratio={r}": standard(d, mix=r) if r < 1 else arm(0, 0, None, None, mix=r)
                        for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)},
    # W Table 6 (common = crop_flip, Cutout, CutMix) plus none and Rebuffi et al.'s MixUp, 1M images.
    "aug": lambda d: {f"augment={a}": standard(d) for a in ("none", "crop_flip", "cutout", "cutmix", "mixup")},
}

ARM = re.compile(r"^(\S+=\S+):$")
GENERATE = re.compile(r"^\s+generate\s+([\d,]+) images, .*\((\d+) heun steps")
SELECT = re.compile(r"^\s+select\s+([\d,]+) kept; .*\((top 20% per class|none)\)")
TRAIN = re.compile(r"^\s+train .*\((\d+) epochs of \d+ steps at batch (\d+), ratio ([\d.]+); ([^;]+?)[;)]")


def parse_plan(text):
    """{arm label: the record `arm()` builds} from `--plan` output."""
    arms, current = {}, None
    for line in text.splitlines():
        if (m := ARM.match(line)):
            current = arms.setdefault(m.group(1), {"generated": 0, "kept": 0, "selection": None, "steps": None})
        elif current is not None and (m := GENERATE.match(line)):
            current.update(generated=int(m.group(1).replace(",", "")), steps=int(m.group(2)))
        elif current is not None and (m := SELECT.match(line)):
            current.update(kept=int(m.group(1).replace(",", "")), selection="topk" if "top" in m.group(2) else "none")
        elif current is not None and (m := TRAIN.match(line)):
            assert m.group(4) == ATTACK, line
            current.update(epochs=int(m.group(1)), batch=int(m.group(2)), ratio=float(m.group(3)))
    return arms


@pytest.mark.parametrize("dataset", sorted(STANDARD))
@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS.glob("ablate_*.py")), ids=lambda p: p.stem)
def test_plan_prints_the_papers_configuration(experiment, dataset, capsys):
    from raylab.tune.experiment import run_ablation

    ablation = runpy.run_path(str(experiment), run_name="not_main")["ABLATION"]
    assert run_ablation(ablation, ["--preset", "paper", "--set", f"data.dataset={dataset}", "--plan"]) == 0
    assert parse_plan(capsys.readouterr().out) == EXPECTED[experiment.stem.removeprefix("ablate_")](dataset)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS.glob("ablate_*.py")), ids=lambda p: p.stem)
@pytest.mark.parametrize("dataset", sorted(STANDARD))
def test_verbs_and_experiments_resolve_the_same_paper_config(experiment, dataset):
    """`raylab train --preset paper` and the experiment's base config differ only where the experiment sets a key
    (its table's setting), in the ratio the paper derives from the data amount, and in the sweep's name."""
    from raylab.tune.experiment import compose

    ablation = runpy.run_path(str(experiment), run_name="not_main")["ABLATION"]
    verb = to_flat(make_config("paper", {"data.dataset": dataset}))
    run = to_flat(compose(ablation, "paper", {"data.dataset": dataset}).cfg)
    differ = {k for k in verb if verb[k] != run[k]}
    assert differ <= {*ablation.overrides.get("paper", {}), "train.ratio", "sweep.name"}
    assert verb["resources.num_workers"] == 4 and verb["resources.max_failures"] == 3  # the cluster, for both


def test_svhn_trains_without_flips_or_crops_and_cifar_with_both():
    """R core/data/svhns.py: SVHN trains on ToTensor() alone; CIFAR on pad & crop & flip (W §5.3 'common')."""
    assert make_config("paper", {"data.dataset": "svhn"}).train.augment == "none"
    assert {make_config("paper", {"data.dataset": d}).train.augment for d in ("cifar10", "cifar100")} == {"crop_flip"}


def test_an_amount_beyond_the_generation_is_refused_in_one_line(capsys):
    from raylab.knobs import ConfigError
    from raylab.tune.experiment import run_ablation

    with pytest.raises(ConfigError, match=r"select.amount: 2,000,000 is more than the 1,000,000 images"):
        make_config("paper", {"select.amount": 2 * M})
    ablation = runpy.run_path(str(EXPERIMENTS / "ablate_amount.py"), run_name="not_main")["ABLATION"]
    assert run_ablation(ablation, ["--preset", "paper", "--set", "data.dataset=svhn", "--values", "50000,5000000",
                                   "--plan"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: select.amount: 5,000,000 is more than")


def test_the_epoch_is_the_references_whole_training_split():
    """R core/data/semisup.py: ceil(len(train split) / B) batches, the 1,024 validation images included: 98 steps
    at batch 512 on CIFAR-10 (not 96), 144 on SVHN's 73,257."""
    from raylab.cost import plan_arm

    steps = {d: next(s for s in plan_arm(make_config("paper", {"data.dataset": d})) if s.stage == "train").steps
             for d in ("cifar10", "svhn")}
    assert steps == {"cifar10": 98 * 400, "svhn": 144 * 400}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS.glob("ablate_*.py")), ids=lambda p: p.stem)
def test_the_miniature_changes_only_sizes_and_keeps_the_papers_rules(experiment):
    """`--preset paper --miniature`: the same config but for the MINIATURE size keys; each arm's selection and ratio
    are those of its full-size arm (the rules run at full size), its amount shrunk with the images."""
    from raylab.config import override
    from raylab.presets import MINIATURE
    from raylab.tune.experiment import compose

    ablation = runpy.run_path(str(experiment), run_name="not_main")["ABLATION"]
    full, small = compose(ablation, "paper", {}), compose(ablation, "paper", {}, small=True)
    big, little = to_flat(full.cfg), to_flat(small.cfg)
    assert {k for k in big if big[k] != little[k]} <= set(MINIATURE)
    assert little["model.name"] == "wrn-10-1" and not little["resources.use_gpu"]
    assert little["resources.num_workers"] == 4 and little["resources.max_failures"] == 3  # the layout stays
    for v_full, v_small in zip(full.values, small.values):
        arm_full = to_flat(override(full.cfg, {ablation.key: v_full, **(full.coupled(v_full) if full.coupled else {})}))
        arm_small = to_flat(override(small.cfg, {ablation.key: v_small,
                                                 **(small.coupled(v_small) if small.coupled else {})}))
        assert {k for k in arm_full if arm_full[k] != arm_small[k]} <= set(MINIATURE) | {ablation.key}
        assert (arm_small["select.policy"], arm_small["train.ratio"]) == (arm_full["select.policy"],
                                                                          arm_full["train.ratio"])


def test_the_miniature_amounts_shrink_with_the_images():
    from raylab.tune.experiment import compose

    ablation = runpy.run_path(str(EXPERIMENTS / "ablate_amount.py"), run_name="not_main")["ABLATION"]
    small = compose(ablation, "paper", {}, values=[str(M), str(5 * M)], small=True)
    assert small.values == [50, 250] and small.cfg.generate.per_class == 100  # 20M / 20,000 over 10 classes
    assert [small.coupled(v) for v in small.values] == [{"select.policy": "topk", "train.ratio": 0.3},
                                                         {"select.policy": "none", "train.ratio": 0.2}]


def test_verbs_take_the_miniature_switch_only_with_the_paper_preset(capsys):
    from raylab import cli

    assert cli.main(["config", "--preset", "paper", "--miniature", "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "train.epochs=3" in out and "model.name=wrn-10-1" in out  # --set still wins, taken literally
    assert cli.main(["config", "--preset", "tiny", "--miniature"]) == 2
    assert "--miniature: shrinks the paper preset" in capsys.readouterr().err


def test_a_view_smaller_than_a_batch_is_refused_by_the_driver_before_any_worker_starts(tmp_path):
    """The miniature's first try: 40 kept images under batches needing 360 generated ones failed in every worker,
    four times over (max_failures 3). The driver refuses it in one line instead."""
    import numpy as np

    from raylab.data.row_index import RowIndex
    from raylab.pipeline.generated_input import GeneratedInput
    from raylab.rehearse.fixtures import place_cifar10
    from raylab.train.job import run_training

    place_cifar10(tmp_path / "data", train_per_class=2, test_per_class=1)
    cfg = make_config("paper", {"tracking.root": str(tmp_path), "data.root": str(tmp_path / "data"),
                                "resources.use_gpu": False})
    view = GeneratedInput(RowIndex.from_positions(["shard.parquet"], np.zeros(40), np.arange(40), np.zeros(40)), {})
    with pytest.raises(ValueError, match=r"the generated view has 40 rows, fewer than one batch's 360 "
                                         r"\(train.batch_size=512, train.ratio=0.3\)"):
        run_training(cfg, generated=view)
    assert not (tmp_path / "train").exists()  # no run directory, no MLflow run


def test_the_paper_job_without_its_generator_or_scorer_stops_in_one_line_before_anything_runs(tmp_path, capsys):
    """README "Scale out": the paper configuration needs generate.checkpoint and select.scorer_checkpoint. Without
    them the job used to start Ray and Tune, then fail in each of its 8 trials."""
    from raylab.rehearse.fixtures import place_cifar10
    from raylab.tune.experiment import run_ablation

    place_cifar10(tmp_path / "data", train_per_class=2, test_per_class=1)
    ablation = runpy.run_path(str(EXPERIMENTS / "ablate_steps.py"), run_name="not_main")["ABLATION"]
    base = ["--preset", "paper", "--set", f"data.root={tmp_path / 'data'}", "--set", f"tracking.root={tmp_path / 'r'}"]
    refusals = {"generate.checkpoint: '' means the committed digits EDM, but data.dataset=cifar10": [],
                "generate.checkpoint: /nowhere does not exist": ["--set", "generate.checkpoint=/nowhere"],
                "select.policy=topk: ranks by the scorer's score": ["--set", f"generate.checkpoint={tmp_path}"]}
    for message, extra in refusals.items():
        assert run_ablation(ablation, base + extra) == 2
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 2 and out[1].startswith(f"error: {message}"), out  # the title line, then the refusal
    assert not (tmp_path / "r").exists()  # no sweep directory, no MLflow store: nothing ran
