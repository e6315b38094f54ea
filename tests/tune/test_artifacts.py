"""Artifact addressing (pure): which sweeps share a generation and which build their own."""
from raylab.config import fingerprint
from raylab.presets import make_config
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


def test_write_config_writes_the_resolved_config_once(tmp_path):
    from raylab.config import from_json
    from raylab.runs import write_config

    cfg = make_config("tiny", {"train.beta": 3.0})
    path = write_config(tmp_path / "generate-abc", cfg, keep=True)
    assert path.name == "config.json" and from_json(path.read_text()) == cfg
    write_config(tmp_path / "generate-abc", make_config("tiny", {"train.beta": 6.0}), keep=True)  # a later trial
    assert from_json(path.read_text()).train.beta == 3.0  # the first one's is kept
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left behind


def test_agreement_without_a_second_scorer_fails_before_generating(tmp_path):
    import pytest

    from raylab.pipeline.select import SelectError
    from raylab.tune.artifacts import artifacts_root, ensure_view

    cfg = make_config("tiny", {"select.policy": "agreement", "tracking.root": str(tmp_path / "runs")})
    with pytest.raises(SelectError, match="select.second_checkpoint"):
        ensure_view(cfg)
    assert not artifacts_root(cfg).exists()
