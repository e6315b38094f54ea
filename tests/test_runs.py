"""Every run, sweep and evaluation directory holds its resolved config as strict JSON, written only when it changed."""
import json
import math
from pathlib import Path

import pytest

from raylab.config import from_json, override, to_json
from raylab.presets import make_config
from raylab.eval.job import Target, eval_fingerprint, result_dir
from raylab.runs import STAGE_INPUTS, run_dir, run_identity, write_config
from raylab.tune.sweep import sweep_dir, sweep_name


def _no_constants(name: str):
    raise ValueError(f"non-JSON constant {name}")


def strict_load(path: Path) -> dict:
    """Parse as a strict reader (jq, JavaScript) would: `Infinity` / `NaN` are errors, not floats."""
    return json.loads(path.read_text(), parse_constant=_no_constants)


@pytest.fixture()
def cfg(tmp_path):
    return make_config("tiny", {"tracking.root": str(tmp_path / "runs")})


def assert_holds_config(directory: Path, cfg) -> None:
    path = directory / "config.json"
    assert path.read_text() == to_json(cfg) + "\n"
    assert strict_load(path)["generate"]["s_max"] == "inf"  # the default s_max is inf: the case that tests strictness
    assert from_json(path.read_text()) == cfg


def test_strict_loader_rejects_what_python_json_writes_by_default(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"s_max": math.inf}))
    with pytest.raises(ValueError, match="Infinity"):
        strict_load(tmp_path / "x.json")


INPUTS = {"original": "1" * 64, "generated": "2" * 64, "scorer": "3" * 64}


@pytest.mark.parametrize("stage", ["edm", "scorer", "generate", "train"])
def test_run_dir_holds_the_resolved_config(cfg, stage):
    run = run_dir(cfg, stage, inputs={k: INPUTS[k] for k in STAGE_INPUTS.get(stage, ())})
    assert run.path == Path(cfg.tracking.root).resolve() / stage / run.name and run.name.startswith(f"{stage}-")
    assert run.config_path == run.path / "config.json"
    assert_holds_config(run.path, cfg)


def test_a_run_identity_is_its_config_and_the_content_of_every_input(cfg):
    """Issue 24: the same config on another generated view (or original split, or scorer) is another run; the same
    inputs give the same name wherever they live; a training run cannot be named without its inputs."""
    name = run_dir(cfg, "train", inputs=INPUTS).name
    assert run_dir(cfg, "train", inputs=dict(INPUTS)).name == name  # deterministic: a rerun finds its directory
    for key in INPUTS:
        assert run_identity(cfg, "train", {**INPUTS, key: "f" * 64}) not in name
    assert run_identity(override(cfg, {"train.epochs": cfg.train.epochs + 1}), "train", INPUTS) not in name
    assert run_identity(override(cfg, {"eval.num_test": 7}), "train", INPUTS) in name  # eval knobs: not training's
    assert run_dir(cfg, "train", inputs=INPUTS, prefix="sweep-x").name == name.replace("train-", "sweep-x-")
    with pytest.raises(ValueError, match="train run identity: no content identity for input.s. generated, scorer"):
        run_dir(cfg, "train", inputs={"original": INPUTS["original"]})


def test_config_is_rewritten_only_when_it_changed(cfg, tmp_path):
    path = write_config(tmp_path / "d", cfg)
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert write_config(tmp_path / "d", cfg) == path
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before  # same config: the file is left alone
    changed = override(cfg, {"eval.num_test": 100})
    write_config(tmp_path / "d", changed)
    assert path.stat().st_ino != before[1]  # replaced by rename (atomically), not edited in place
    assert_holds_config(tmp_path / "d", changed)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json"]  # no temp file left behind


def test_sweep_dir_holds_the_resolved_config(cfg):
    space = {"train.beta": [5.0, 6.0]}
    path = sweep_dir(cfg, space)
    assert path == Path(cfg.tracking.root).resolve() / "tune" / sweep_name(cfg, space)
    assert_holds_config(path, cfg)


def test_eval_result_dir_holds_the_resolved_config(cfg, tmp_path):
    run = tmp_path / "runs" / "train" / "train-x"
    evaluated = override(cfg, {"eval.checkpoint": "last", "eval.num_test": 50})
    out = result_dir(Target(evaluated, run / "last.pt", "last", run), "ab" * 32)
    assert out == run / "eval" / eval_fingerprint(evaluated, "ab" * 32)
    assert_holds_config(out, evaluated)
    bare = result_dir(Target(cfg, tmp_path / "ckpt" / "model.pt", "model.pt", None), "cd" * 32, tmp_path / "elsewhere")
    assert bare.parent == tmp_path / "elsewhere"
    assert_holds_config(bare, cfg)
