"""Artifact addressing (pure): which sweeps share a generation and which build their own."""
from raylab.config import fingerprint, make_config
from raylab.runs import GENERATION_KEYS
from raylab.tune.artifacts import VIEW_KEYS


def keys(overrides):
    cfg = make_config("tiny", overrides)
    return fingerprint(cfg, GENERATION_KEYS), fingerprint(cfg, VIEW_KEYS)


def test_training_knobs_share_one_generation_and_one_view():
    base = keys({})
    for knob in ({"train.beta": 3.0}, {"train.epochs": 7}, {"train.ratio": 0.5}, {"train.label_smoothing": 0.0},
                 {"train.augment": "cutout"}, {"eval.pgd_steps": 3}):
        assert keys(knob) == base, knob


def test_steps_build_their_own_generation_and_amounts_share_one():
    base_gen, base_view = keys({})
    assert keys({"generate.steps": 4})[0] != base_gen and keys({"generate.steps": 4}) != keys({"generate.steps": 8})
    gen, view = keys({"select.amount": 100})
    assert gen == base_gen and view != base_view  # Wang et al. 2023 Table 5: amounts are prefixes of one generation


def test_the_sweep_driver_pins_relative_roots_and_the_sweep_name_ignores_them(tmp_path, monkeypatch):
    """Tune runs trials in their own directories: a relative root must reach them absolute (the README's default
    `tracking.root=runs` once sent every trial to an empty MLflow store)."""
    from raylab.config import pin_paths
    from raylab.tracking import resolve_tracking_uri
    from raylab.tune.sweep import sweep_name

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = make_config("tiny", {"tracking.root": "runs"})
    pinned = pin_paths(cfg)
    assert pinned.tracking.root == str(tmp_path / "runs") and pinned.data.root == str(tmp_path / cfg.data.root)
    monkeypatch.chdir(tmp_path.parent)  # where a trial would read it
    assert resolve_tracking_uri(pinned.tracking) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    space = {"generate.steps": [2, 4]}
    assert sweep_name(pinned, space) == sweep_name(cfg, space)
