"""Config round trips and every class of validation error."""
import dataclasses
import json
import math

import pytest

from raylab.config import (STAGES, ExperimentConfig, all_keys, fingerprint, from_flat, from_json, override,
                           parse_assignments, to_flat, to_json)
from raylab.knobs import ConfigError
from raylab.presets import PRESETS, make_config
from raylab.data.datasets import get_dataset


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_round_trips(preset):
    cfg = make_config(preset)
    assert from_flat(to_flat(cfg)) == cfg
    assert from_json(to_json(cfg)) == cfg
    assert set(to_flat(cfg)) == set(all_keys())


def test_paper_preset_is_the_papers_recipe():
    c = make_config("paper")
    assert (c.model.name, c.model.activation, c.train.batch_size, c.train.epochs) == ("wrn-28-10", "silu", 512, 400)
    assert (c.train.lr, c.train.momentum, c.train.nesterov, c.train.weight_decay) == (0.2, 0.9, True, 5e-4)
    assert (c.train.beta, c.train.label_smoothing, c.train.ema_tau, c.train.ratio) == (5.0, 0.1, 0.995, 0.3)
    assert (c.attack.steps, c.attack.eps, c.attack.step) == (10, 8 / 255, None)  # None: attacks.default_step
    assert (c.generate.steps, c.select.top_fraction, c.select.policy) == (20, 0.2, "topk")
    assert c.generate.per_class == 500_000  # 5M generated CIFAR-10 images before the top-20% filter
    assert (c.train.scheduler, c.train.warmup_frac) == ("onecycle", 0.025)
    # Validation holdout: the dataset's own default, resolved when the data is loaded (1024 CIFAR-10 images).
    assert c.data.val_size is None and get_dataset(c.data.dataset).val_size == 1024


@pytest.mark.parametrize("section", sorted(STAGES))
def test_every_stage_is_frozen(section):
    stage = getattr(make_config("tiny"), section)
    name = dataclasses.fields(stage)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(stage, name, getattr(stage, name))
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_config("tiny").train = stage


def _no_constants(name):
    raise ValueError(f"non-JSON constant {name}")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_json_is_strict_and_round_trips_inf(preset):
    cfg = override(make_config(preset), {"generate.s_churn": 40.0})  # s_max stays inf, the default
    text = to_json(cfg)
    assert "Infinity" not in text and "NaN" not in text
    nested = json.loads(text, parse_constant=_no_constants)
    assert nested["generate"]["s_max"] == "inf"
    again = from_json(text)
    assert again == cfg and math.isinf(again.generate.s_max) and isinstance(again.generate.s_max, float)


def test_strings_are_parsed_like_the_cli():
    cfg = from_flat(parse_assignments(["attack.eps=8/255", "train.nesterov=false", "edm.channel_mult=1,2,2",
                                       "train.beta=none", "train.loss=pgd_at", "generate.s_max=inf"]))
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.train.nesterov is False and cfg.train.beta is None
    assert cfg.edm.channel_mult == (1, 2, 2) and math.isinf(cfg.generate.s_max)
    assert isinstance(from_flat({"train.lr": 1}).train.lr, float)


@pytest.mark.parametrize("flat, message", [
    ({"train.lrr": 0.1}, "unknown config key (did you mean 'train.lr'?)"),
    ({"nosection.x": 1}, "unknown config key"),
    ({"train.lr": "fast"}, "cannot parse 'fast' as float"),
    ({"train.epochs": 2.5}, "expected int"),
    ({"train.nesterov": 1}, "expected bool"),
    ({"train.epochs": True}, "expected int"),
    ({"train.ratio": 1.5}, "out of range"),
    ({"generate.steps": 0}, "out of range"),
    ({"attack.eps": -0.1}, "out of range"),
    ({"train.lr": 0}, "must be > 0"),
    ({"model.name": "vit"}, "is not one of"),
    ({"train.beta": None}, "required by train.loss=trades"),
    ({"train.batch_size": 65, "resources.num_workers": 2}, "not divisible by resources.num_workers=2"),
    ({"edm.batch_size": 33, "resources.num_workers": 2}, "edm.batch_size: 33 is not divisible by resources.num"),
    ({"generate.sigma_min": 100.0}, "must be < generate.sigma_max"),
    ({"train.lr": float("nan")}, "NaN"),
    ({"train.beta": "inf"}, "train.beta: inf is not allowed (must be finite)"),
    ({"train.grad_clip": float("inf")}, "train.grad_clip: inf is not allowed"),
    ({"edm.p_mean": "-inf"}, "edm.p_mean: -inf is not allowed"),
    ({"generate.s_max": "-inf"}, "generate.s_max: -inf is not allowed"),
    ({"attack.eps": "300/255"}, "attack.eps: 1.17647 is out of range for attack.norm=linf (must be <= 1 in [0, 1]"),
    ({"eval.eps": "300/255"}, "eval.eps: 1.17647 is out of range for eval.norm=linf"),
    ({"attack.norm": "l2", "attack.eps": 56.0},
     "attack.eps: 56 is out of range for attack.norm=l2 (must be <= 55.43 in [0, 1] pixels, e.g. 128/255)"),
    ({"eval.autoattack": "standard", "eval.aa_iters": 25}, "only with eval.autoattack=custom"),
])
def test_validation_errors_are_one_line_and_name_the_key(flat, message):
    with pytest.raises(ConfigError) as err:
        from_flat(flat)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert text.split(":")[0] in set(all_keys()) | set(flat)


def test_threat_models_up_to_the_whole_pixel_range_are_allowed():
    """linf up to 1 (every pixel anywhere in [0, 1]); l2 above 1 (128/255 is the papers', 2.0 is not rare) up to
    sqrt(3072), the diagonal of the 32x32x3 cube."""
    assert from_flat({"attack.eps": 1.0, "eval.eps": "255/255"}).attack.eps == 1.0
    cfg = from_flat({"attack.norm": "l2", "attack.eps": "128/255", "eval.norm": "l2", "eval.eps": 2.0})
    assert cfg.attack.eps == pytest.approx(128 / 255) and cfg.eval.eps == 2.0
    assert from_flat({"eval.norm": "l2", "eval.eps": math.sqrt(3072)}).eval.eps == math.sqrt(3072)


@pytest.mark.parametrize("setting", ["train.beta=inf", "attack.eps=300/255"])
def test_a_refused_knob_stops_the_cli_before_anything_is_written(tmp_path, capsys, setting):
    from raylab.cli import main

    root = tmp_path / "runs"
    assert main(["train", "--set", setting, "--set", f"tracking.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raylab: error: {setting.split('=')[0]}: ") and "\n" not in err
    assert not root.exists()


def test_override_leaves_the_original_untouched_and_fingerprint_tracks_only_chosen_keys():
    base = make_config("tiny")
    new = override(base, {"train.beta": 6.0})
    assert base.train.beta == 5.0 and new.train.beta == 6.0
    assert fingerprint(base, ["generate", "edm"]) == fingerprint(new, ["generate", "edm"])
    assert fingerprint(base, ["train.beta"]) != fingerprint(new, ["train.beta"])
    assert fingerprint(base, ["generate"]) != fingerprint(override(base, {"generate.steps": 5}), ["generate"])


def test_where_files_live_is_not_part_of_a_content_address():
    base = make_config("tiny")
    moved = override(base, {"data.root": "/elsewhere/data", "data.download": True, "tracking.root": "/elsewhere"})
    assert fingerprint(base, ["data", "tracking"]) == fingerprint(moved, ["data", "tracking"])
    assert fingerprint(base, ["data"]) != fingerprint(override(base, {"data.val_size": 64}), ["data"])


def test_every_stage_is_in_the_experiment():
    assert set(STAGES) == {f for f in ExperimentConfig.__dataclass_fields__}
    with pytest.raises(ConfigError, match="preset"):
        make_config("huge")


def test_the_paper_preset_takes_each_datasets_own_values():
    """CIFAR-100 at 25 steps and 50K per class (5M, not 50M); SVHN at 25 steps, 1M, unfiltered; --set still wins."""
    c100 = make_config("paper", {"data.dataset": "cifar100"})
    assert (c100.generate.steps, c100.generate.per_class, c100.select.policy) == (25, 50_000, "topk")
    svhn = make_config("paper", {"data.dataset": "svhn"})
    assert (svhn.generate.steps, svhn.generate.per_class, svhn.select.policy) == (25, 100_000, "none")
    c10 = make_config("paper", {"data.dataset": "cifar10"})
    assert (c10.generate.steps, c10.generate.per_class) == (20, 500_000)
    assert make_config("paper", {"data.dataset": "cifar100", "generate.steps": 30}).generate.steps == 30
    assert make_config("tiny", {"data.dataset": "cifar100"}).generate.steps == 10  # other presets: unchanged
