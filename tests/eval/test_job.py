"""Sharded evaluation: exact equality with one process, resume, actor crash, MLflow report, known answers, guards.

Cheap models (a 4-channel CNN, a constant-class model) carry the Ray tests whose AutoAttack must attack many
points; the real path (run directory -> WRN-16-2 -> actors -> MLflow) runs once on 4 images, where an untrained
WRN leaves AutoAttack only a couple of points.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raylab.config import EvalConfig, ResourcesConfig, to_flat, to_json
from raylab.knobs import ConfigError
from raylab.presets import make_config
from raylab.data.datasets import get_dataset
from raylab.eval.chunk import ChunkJob, evaluate_chunk, plan_chunks, to_float
from raylab.eval.job import chunk_path, evaluate, run_eval
from raylab.eval.metrics import EvalError
from raylab.eval.report import format_table
from raylab.io import sha256_file
from raylab.models import create_model

# ---------------------------------------------------------------------------------------------------------------
# Cheap model sources (picklable: Ray actors import this module to rebuild them).


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 16 * 16, 10))

    def forward(self, x):
        return self.net(x)


class ConstantClass(nn.Module):
    """Logits independent of the input (but differentiable w.r.t. it): always predicts `cls`."""

    def __init__(self, cls: int):
        super().__init__()
        self.bias = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(cls), 10).float())

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True) * 0.0 + self.bias


@dataclasses.dataclass(frozen=True)
class TinySource:
    seed: int = 0
    train_mode: bool = False

    def load(self, device):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = TinyCNN()
        return model.to(device).train(self.train_mode)


@dataclasses.dataclass(frozen=True)
class ConstantSource:
    cls: int

    def load(self, device):
        return ConstantClass(self.cls).to(device).eval()


def digits(n):
    _, test = get_dataset("digits").load(Path("data"), False)
    return test.images[:n], test.labels[:n]


def own_labels(images):
    """The tiny CNN's own predictions, every 4th shifted: clean accuracy 75 %, AutoAttack has points to attack."""
    with torch.no_grad():
        y = TinySource().load(torch.device("cpu"))(to_float(images)).argmax(1).numpy()
    y[::4] = (y[::4] + 1) % 10
    return y


# At 1.5/255 APGD-CE breaks some of the tiny CNN's points but not all (every robust point costs 5 x 100 steps).
EV = EvalConfig(chunk_size=8, batch_size=8, pgd_steps=3, eps=1.5 / 255, autoattack="custom", aa_attacks="apgd-ce",
                seed=3, certify=True, certify_n0=4, certify_n=16)
TWO_ACTORS = ResourcesConfig(eval_actors=2, cpus_per_actor=1.0, max_failures=1)


def same_outcomes(a, b):
    ra, rb = a.result, b.result
    assert np.array_equal(ra.labels, rb.labels)
    assert np.array_equal(ra.clean, rb.clean) and np.array_equal(ra.pgd, rb.pgd)
    assert np.array_equal(ra.aa.fell_at, rb.aa.fell_at) and ra.aa.attacks == rb.aa.attacks
    assert np.array_equal(ra.cert_preds, rb.cert_preds) and np.array_equal(ra.cert_radii, rb.cert_radii)
    assert format_table(ra) == format_table(rb)


@pytest.fixture(scope="module")
def data():
    images, _ = digits(24)
    return images, own_labels(images)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The reference: one process, the same chunks and seed."""
    return evaluate(TinySource(), *data, EV, tmp_path_factory.mktemp("single"), engine="local")


@pytest.fixture(scope="module")
def sharded(data, tmp_path_factory, ray_session):
    """2 actors; the actor that first reaches chunk 2 kills its own process (fault drill) and is retried."""
    root = tmp_path_factory.mktemp("sharded")
    marker = root / "crashed"
    out = evaluate(TinySource(), *data, EV, root / "out", resources=TWO_ACTORS, engine="ray",
                   crash={"chunk": 2, "marker": str(marker)})
    return out, marker


# ---------------------------------------------------------------------------------------------------------------


def test_single_process_result_is_nontrivial(single):
    r = single.result
    assert single.chunks_total == 3 == single.chunks_computed and r.n == 24
    assert r.clean_acc == 0.75 and 0 < r.aa_acc < r.clean_acc  # AutoAttack broke some points, not all
    assert r.aa.attacks == ("apgd-ce",) and r.cert_radii.shape == (24,)
    assert np.array_equal(r.aa.clean, r.clean)


def test_sharded_equals_single_process_exactly(single, sharded):
    out, _ = sharded
    same_outcomes(out, single)
    records = [json.loads(chunk_path(out.out_dir, i).read_text()) for i in range(3)]
    assert [(r["start"], r["stop"]) for r in records] == [(0, 8), (8, 16), (16, 24)]


def test_crashed_actor_is_retried_and_nothing_is_lost(sharded):
    out, marker = sharded
    assert marker.exists(), "the fault drill never fired"
    assert out.chunks_computed == 3 and all(chunk_path(out.out_dir, i).exists() for i in range(3))
    assert not list((out.out_dir / "state").glob("*.json"))  # AutoAttack states are cleaned up


def test_resume_recomputes_only_missing_chunks(data, single, sharded, tmp_path):
    """What an interrupted job leaves: some chunk files. The rerun plans the missing ones only (driver logic,
    the same for both engines; the local one keeps this test fast)."""
    copy = tmp_path / "resume"
    shutil.copytree(sharded[0].out_dir, copy)
    chunk_path(copy, 1).unlink()
    mtimes = {i: chunk_path(copy, i).stat().st_mtime_ns for i in (0, 2)}
    again = evaluate(TinySource(), *data, EV, copy, engine="local")
    assert again.chunks_computed == 1 and chunk_path(copy, 1).exists()
    assert {i: chunk_path(copy, i).stat().st_mtime_ns for i in (0, 2)} == mtimes
    same_outcomes(again, single)
    assert evaluate(TinySource(), *data, EV, copy, engine="local").chunks_computed == 0


def test_constant_class_model_keeps_exactly_its_clean_accuracy(tmp_path):
    images, labels = digits(16)
    ev = dataclasses.replace(EV, eps=16 / 255, aa_attacks="apgd-ce", certify=False)
    out = evaluate(ConstantSource(int(labels[0])), images, labels, ev, tmp_path, engine="local",
                   checks=["accuracy_vs_eps"])
    r = out.result
    assert r.clean_acc == (labels == labels[0]).mean() > 0
    assert np.array_equal(r.pgd, r.clean) and np.array_equal(r.aa.robust, r.clean) and r.aa_acc == r.clean_acc
    # Accuracy that does not fall with eps is the gradient-masking signature: the report says so.
    assert not r.checks[0].passed
    assert "WARNING gradient-masking check accuracy_vs_eps FAILED" in format_table(r)
    from raylab.eval.metrics import wilson_interval

    low, high = wilson_interval(r.clean_acc, 16)
    clean_line = next(line for line in format_table(r).splitlines() if line.startswith("clean "))
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in clean_line and "95% Wilson" in format_table(r)


def test_train_mode_model_is_rejected_before_any_compute(data, tmp_path):
    images, labels = data
    model = TinySource(train_mode=True).load(torch.device("cpu"))
    with pytest.raises(EvalError, match="train mode"):
        evaluate_chunk(model, to_float(images[:4]), torch.as_tensor(labels[:4]), ChunkJob(0, EV, 10))
    with pytest.raises(EvalError, match="train mode"):
        evaluate(TinySource(train_mode=True), images, labels, EV, tmp_path / "out", engine="local")
    assert not list((tmp_path / "out").glob("chunk-*.json"))


def test_chunk_plan_is_fixed():
    assert plan_chunks(10, 4) == ((0, 4), (4, 8), (8, 10)) and plan_chunks(0, 4) == ()


# ---------------------------------------------------------------------------------------------------------------
# The real path: a "trained run directory" written by hand (config.json + best.pt of an untrained WRN-16-2 +
# an MLflow run), evaluated on Ray with 2 actors.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from raylab.tracking import Tracker

    root = tmp_path_factory.mktemp("runs")
    # A WRN-16-2 trained at 8/255 (the tiny preset's own model and eps are others): the mismatch warnings below
    cfg = make_config("tiny", {"tracking.root": str(root), "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
                               "model.name": "wrn-16-2", "attack.eps": 8 / 255, "eval.eps": 8 / 255})
    path = root / "train" / "train-test"
    path.mkdir(parents=True)
    (path / "config.json").write_text(to_json(cfg))
    spec = get_dataset("digits")
    torch.manual_seed(2)  # this init gets 2 of the first 4 test images right: AutoAttack has 1 point per chunk
    model = create_model("wrn-16-2", num_classes=10, mean=spec.mean, std=spec.std).eval()
    torch.save({"model": model.state_dict(), "epoch": 3, "metrics": {}}, path / "best.pt")
    torch.save({"model": model.state_dict(), "epoch": 4, "metrics": {}}, path / "last.pt")
    with Tracker.start(cfg.tracking, "train-test", params=to_flat(cfg), config_json=to_json(cfg)) as tracker:
        (path / "mlflow_run_id").write_text(tracker.run_id)
    return path, cfg


def test_untrained_wrn_is_not_robust_at_large_eps_and_the_run_gets_the_report(run, ray_session, capsys):
    from raylab.tracking import client_for, get_run

    path, cfg = run
    out = run_eval(path, {"eval.num_test": 4, "eval.chunk_size": 2, "eval.pgd_steps": 2, "eval.eps": "64/255",
                          "eval.certify": True, "eval.certify_n0": 4, "eval.certify_n": 8,
                          "resources.eval_actors": 2, "eval.aa_attacks": "apgd-ce,apgd-t", "eval.aa_iters": 5,
                          "eval.aa_restarts": 1, "eval.aa_target_classes": 2})
    r = out.result
    assert r.clean_acc > 0 and r.aa_acc == 0.0 and r.pgd_acc <= r.clean_acc
    printed = capsys.readouterr().out
    assert "WARNING threat model mismatch: trained against linf eps=8/255 (0.03137), evaluated against linf " \
           "eps=64/255" in printed  # eval.eps 64/255 on a model trained at 8/255
    for label in ("wrn-16-2 on digits", "checkpoint best (epoch 3)", "4 test images", "linf eps=64/255",
                  "AutoAttack version custom [apgd-ce, apgd-t; 5 it, 1 restart, 2 targets]", "PGD-2"):
        assert label in printed
    uri = cfg.tracking.uri
    logged = get_run(uri, out.mlflow_run_id)
    assert logged.status == "FINISHED"  # attached, not reopened
    # Two attacks in one MLflow metric name: '+' is refused by MLflow, so they are joined by '.'
    assert logged.metrics["eval_clean_acc"] == r.clean_acc and logged.metrics["eval_aa_apgd-ce.apgd-t_acc"] == 0.0
    assert logged.metrics["eval_pgd2_acc"] == r.pgd_acc and "eval_aa_after_apgd-ce" in logged.metrics
    assert logged.tags["eval.best.weights_sha256"] == sha256_file(path / "best.pt")  # which weights these are
    folder = f"eval/best-{out.out_dir.name}"
    names = {Path(a.path).name for a in client_for(uri).list_artifacts(out.mlflow_run_id, folder)}
    assert {"results.csv", "results.json", "summary.json", "certified_accuracy.png"} <= names
    assert out.out_dir.parent == path / "eval" and (out.out_dir / "summary.json").exists()
    # last.pt lands in the same run under its own names, leaving best's numbers alone.
    last = run_eval(path, {"eval.checkpoint": "last", "eval.num_test": 4, "eval.pgd_steps": 2,
                           "eval.autoattack": "none"}, engine="local")
    metrics = get_run(uri, out.mlflow_run_id).metrics
    assert metrics["eval_last_clean_acc"] == last.clean_acc and "eval_last_aa_acc" not in metrics
    assert metrics["eval_clean_acc"] == r.clean_acc and last.result.header.epoch == 4


def test_an_intended_transfer_evaluation_is_reported_as_one(run, capsys):
    path, _ = run
    base = {"eval.num_test": 4, "eval.pgd_steps": 1, "eval.autoattack": "none", "eval.norm": "l2", "eval.eps": 0.5}
    plain = run_eval(path, base, engine="local", track=False)
    assert any(w.startswith("WARNING threat model mismatch") for w in plain.result.warnings())
    capsys.readouterr()
    transfer = run_eval(path, {**base, "eval.transfer": True}, engine="local", track=False)
    printed = capsys.readouterr().out
    assert "transfer evaluation: trained against linf eps=8/255 (0.03137), evaluated against l2 eps=0.5" in printed
    assert "WARNING threat model" not in printed
    assert transfer.out_dir == plain.out_dir  # a reporting flag: the chunks are the same evaluation's
    matched = run_eval(path, {**base, "eval.norm": "linf", "eval.eps": "8/255"}, engine="local", track=False)
    assert not [w for w in matched.result.warnings() if "threat model" in w or "transfer" in w]


def test_retrained_weights_are_a_new_evaluation_and_unchanged_weights_resume(run, tmp_path):
    """An evaluation's identity holds its checkpoint's sha256 (raylab.runs "eval"): the same best.pt resumes every
    chunk, a best.pt changed by more training is evaluated afresh in its own directory."""
    copy = tmp_path / "train-copy"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("eval", "mlflow_run_id"))  # the fixture's run stays
    settings = {"eval.num_test": 4, "eval.chunk_size": 2, "eval.pgd_steps": 1, "eval.autoattack": "none"}
    first = run_eval(copy, settings, engine="local")
    again = run_eval(copy, settings, engine="local")
    assert again.out_dir == first.out_dir and (again.chunks_computed, first.chunks_computed) == (0, 2)
    state = torch.load(copy / "best.pt", weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({**state, "epoch": 5}, copy / "best.pt")
    retrained = run_eval(copy, settings, engine="local")
    assert retrained.out_dir.parent == first.out_dir.parent and retrained.out_dir != first.out_dir
    assert retrained.chunks_computed == 2 and retrained.result.header.epoch == 5
    summary = json.loads((retrained.out_dir / "summary.json").read_text())
    assert summary["weights_sha256"] == sha256_file(copy / "best.pt")


def test_run_directory_guards(run):
    path, _ = run
    with pytest.raises(ConfigError, match="model.name: fixed by"):
        run_eval(path, {"model.name": "wrn-28-10"}, engine="local")
    with pytest.raises(EvalError, match="eval.num_test: 5000 exceeds the 300 test images"):
        run_eval(path, {"eval.num_test": 5000}, engine="local")
    bare = path.parent / "no-weights"
    bare.mkdir()
    shutil.copy(path / "config.json", bare)
    with pytest.raises(EvalError, match="best.pt is missing"):
        run_eval(bare, engine="local")
    with pytest.raises(EvalError, match="neither a run directory nor a checkpoint file"):
        run_eval(path / "nothing-here", engine="local")
