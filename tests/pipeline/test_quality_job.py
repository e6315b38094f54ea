"""Quality metrics of the generation job: scorer-feature FD and Inception FID (a user-supplied TorchScript
detector), both against real *test* images, logged to MLflow and printed in the summary."""
import shutil

import numpy as np
import pytest
import torch

from raylab.config import override
from raylab.data.datasets import load_splits
from raylab.data.shards import read_numpy
from raylab.pipeline import generate_job
from raylab.pipeline.generate_job import run_generate
from raylab.pipeline.quality import Scorer, inception_fid, scorer_fd
from raylab.tracking import get_run


class _TinyInception(torch.nn.Module):
    """The detector interface on a budget: uint8 NCHW → 32 fixed pixel features with return_features=True."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float().flatten(1)[:, ::97] / 255.0


def test_fd_and_inception_fid_use_test_images_and_reach_mlflow_and_the_summary(reference_run, tmp_path, mlflow_uri,
                                                                               capsys):
    cfg, ref = reference_run
    detector = tmp_path / "inception.pt"
    torch.jit.script(_TinyInception()).save(str(detector))
    store = shutil.copytree(ref.store, tmp_path / "store")  # complete: nothing is sampled, only reported
    cfg = override(cfg, {"tracking.uri": mlflow_uri, "generate.inception_weights": str(detector)})
    out = run_generate(cfg, store, track=True, fd_images=60)

    generated = read_numpy(store, ["image"], rows=generate_job._first_rows(store, 60), verify=False)["image"]
    test = load_splits(cfg.data).test
    real = test.images[np.sort(np.random.default_rng(0).permutation(len(test))[:60])]
    expected = {"fd_scorer_features": scorer_fd(Scorer.load(ref.spec.scorer), generated, real),
                "fid_inception": inception_fid(detector, generated, real)}
    assert out.quality == pytest.approx(expected, rel=1e-6)
    assert all(v > 0 for v in expected.values())

    run = get_run(mlflow_uri, out.mlflow_run_id)
    assert {k: run.metrics[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert "not Inception FID" in run.tags["fd_scorer_features.label"]
    assert run.tags["fid_inception.label"].startswith("FID (Inception)")
    assert "60 generated vs 60 real test images" in run.tags["fid_inception.label"]
    printed = capsys.readouterr().out
    assert f"fid_inception {expected['fid_inception']:.4g}" in printed and "fd_scorer_features" in printed
