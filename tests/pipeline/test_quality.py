"""Fréchet distance math, scorer outputs and the feature hooks ("FD (scorer features)", Inception from a file)."""
import numpy as np
import pytest
import scipy.linalg
import torch

from raylab.pipeline.quality import (FD_LABEL, InceptionFeatures, QualityError, Scorer, feature_stats,
                                     frechet_distance, frechet_distance_features, inception_fid, score_columns,
                                     scorer_fd, scorer_identity, trace_sqrt_product)


def _feats(rng, n=400, d=16, shift=0.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix.T + shift


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = _feats(rng)
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-8)
    fds = [frechet_distance_features(x, x + s) for s in (0.1, 0.5, 1.0)]
    d = x.shape[1]
    np.testing.assert_allclose(fds, [d * s ** 2 for s in (0.1, 0.5, 1.0)], rtol=1e-6)  # pure mean shift: |Δμ|²
    assert frechet_distance_features(x, 2 * x) > 0.1  # a scale change moves the covariance term


def test_trace_sqrt_matches_scipy_sqrtm_and_survives_singular_covariances():
    rng = np.random.default_rng(1)
    _, c1 = feature_stats(_feats(rng))
    _, c2 = feature_stats(_feats(rng))
    reference = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
    assert trace_sqrt_product(c1, c2) == pytest.approx(reference, rel=1e-8)
    few = _feats(rng, n=5, d=32)  # rank-4 covariances in 32 dimensions
    fd = frechet_distance_features(few, few)
    assert np.isfinite(fd) and fd == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(QualityError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_score_columns_use_the_conditioning_class_or_the_pseudo_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    cols = score_columns(probs, np.array([1, -1]))
    assert cols["label"].tolist() == [1, 2] and cols["pred"].tolist() == [0, 2]
    np.testing.assert_allclose(cols["score"], [0.2, 0.6])
    np.testing.assert_allclose(cols["confidence"], [0.7, 0.6])
    with pytest.raises(QualityError, match="class 5"):
        score_columns(probs, np.array([5, 0]))


def test_scorer_features_come_from_the_penultimate_layer(assets):
    scorer = Scorer.load(scorer_identity(assets["scorer"]))
    images = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    feats = scorer.features(images, batch=4)
    assert feats.shape == (6, scorer.model.logits.in_features)
    logits = feats @ scorer.model.logits.weight.detach().numpy().T + scorer.model.logits.bias.detach().numpy()
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), scorer.probs(images), atol=1e-5)
    assert scorer_fd(scorer, images, images) == pytest.approx(0.0, abs=1e-6)
    assert FD_LABEL == "FD (scorer features)"


class _FakeInception(torch.nn.Module):
    """The detector interface: uint8 NCHW in, (N, F) pool features with return_features=True."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def test_inception_fid_runs_a_user_supplied_torchscript_detector(tmp_path):
    path = tmp_path / "detector.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    rng = np.random.default_rng(3)
    a = rng.integers(0, 200, (20, 8, 8, 3), dtype=np.uint8)
    assert InceptionFeatures(path)(a).shape == (20, 3)
    assert inception_fid(path, a, a) == pytest.approx(0.0, abs=1e-6)
    assert inception_fid(path, a, a + 50) > 1000
    with pytest.raises(QualityError, match="downloads nothing"):
        InceptionFeatures(tmp_path / "missing.pt")


class _NoFeatures(torch.nn.Module):
    """TorchScript, but not the detector interface (no return_features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def test_bad_inception_weights_fail_in_plan_job_before_any_store_exists(assets, tmp_path):
    from raylab.pipeline.generators import GenerateError
    from raylab.pipeline.generate_job import plan_job
    from tests.pipeline.helpers import job_config

    torch.save({"w": torch.zeros(3)}, tmp_path / "pickled.pt")  # a state dict, not TorchScript
    torch.jit.script(_NoFeatures()).save(str(tmp_path / "other.pt"))
    cases = {"pickled.pt": "not a TorchScript module", "missing.pt": "no such file", "other.pt": "not callable"}
    for i, (name, message) in enumerate(cases.items()):
        cfg = job_config(assets, tmp_path, {"generate.inception_weights": str(tmp_path / name)})
        with pytest.raises(GenerateError, match=f"generate.inception_weights: .*{message}") as err:
            plan_job(cfg, tmp_path / f"store{i}")
        assert "\n" not in str(err.value)
        assert not (tmp_path / f"store{i}").exists()
