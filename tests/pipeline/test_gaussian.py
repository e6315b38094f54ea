"""The class-conditional Gaussian generator: the fit, per-image seeded sampling, the parameters file."""
import numpy as np
import pytest

from raylab.generate.seeds import image_seeds
from raylab.pipeline.gaussian import (DIM, GaussianError, fit_gaussian, load_gaussian, sample_gaussian,
                                      save_gaussian)


def _data(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: low-rank Gaussian images around different means, well inside [0, 255] (no clipping)."""
    basis = rng.standard_normal((DIM, 4)) / np.sqrt(DIM) * np.array([600.0, 400.0, 200.0, 100.0])
    images, labels = [], []
    for c, centre in enumerate((100.0, 150.0)):
        x = centre + rng.standard_normal((n_per_class, 4)) @ basis.T + 2.0 * rng.standard_normal((n_per_class, DIM))
        images.append(np.clip(np.rint(x), 0, 255).astype(np.uint8))
        labels.append(np.full(n_per_class, c))
    return np.concatenate(images).reshape(-1, 32, 32, 3), np.concatenate(labels)


def test_samples_match_the_fitted_mean_and_covariance():
    images, labels = _data(300, np.random.default_rng(0))
    fit = fit_gaussian(images, labels, num_classes=2, rank=16)
    n = 1500
    x = sample_gaussian(fit, image_seeds(0, 1, range(n)), np.ones(n, int)).reshape(n, DIM).astype(np.float64)
    f, r = fit.factor[1].astype(np.float64), fit.resid_std[1].astype(np.float64)
    var = (f ** 2).sum(1) + r ** 2  # diag(F Fᵀ + diag(r²)), without building the 3072² matrix
    # Mean: every pixel within 5 standard errors; variance within 15% on average.
    assert np.all(np.abs(x.mean(0) - fit.mean[1]) < 5 * np.sqrt(var / n) + 0.5)
    assert abs(x.var(0, ddof=1).mean() / var.mean() - 1) < 0.15
    # Variance along the top fitted direction (the low-rank structure, not just the diagonal): |F₀|² + Σ r² u².
    top = f[:, 0] / np.linalg.norm(f[:, 0])
    expected = np.linalg.norm(f[:, 0]) ** 2 + (r ** 2 * top ** 2).sum()
    assert expected > 10 * var.mean()
    assert abs(((x - x.mean(0)) @ top).var() / expected - 1) < 0.15
    # And the fit itself reproduces the data's statistics.
    data1 = images[labels == 1].reshape(-1, DIM).astype(np.float64)
    np.testing.assert_allclose(fit.mean[1], data1.mean(0), atol=1e-3)
    np.testing.assert_allclose(var, data1.var(0, ddof=1), rtol=1e-3, atol=1e-3)


def test_bytes_depend_only_on_the_seed_and_the_file_round_trips(tmp_path):
    images, labels = _data(40, np.random.default_rng(1))
    fit = fit_gaussian(images, labels, num_classes=2, rank=8)
    seeds = image_seeds(5, 0, range(6))
    whole = sample_gaussian(fit, seeds, [0, 1, 0, 1, 0, 1])
    one = sample_gaussian(fit, seeds[3:4], [1])
    np.testing.assert_array_equal(whole[3], one[0])
    assert whole.dtype == np.uint8 and whole.shape == (6, 32, 32, 3)
    loaded = load_gaussian(save_gaussian(fit, tmp_path / "g.npz"))
    np.testing.assert_array_equal(sample_gaussian(loaded, seeds, [0] * 6), sample_gaussian(fit, seeds, [0] * 6))
    assert loaded.rank == 8 and loaded.counts.tolist() == [40, 40]


def test_bad_inputs_fail_before_any_compute(tmp_path):
    images, labels = _data(5, np.random.default_rng(2))
    with pytest.raises(GaussianError, match="every class"):
        fit_gaussian(images, labels, num_classes=3)
    fit = fit_gaussian(images, labels, num_classes=2, rank=2)
    with pytest.raises(GaussianError, match="labels"):
        sample_gaussian(fit, [1, 2], [0, 2])
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(GaussianError, match="bad.npz"):
        load_gaussian(tmp_path / "bad.npz")


def test_rank_zero_keeps_the_full_covariance_and_a_rank_truncates_it():
    """generate.gaussian_rank: 0 = every principal direction (the sample covariance exactly), k = the top k plus
    the diagonal residual (pixel variances still exact, off-diagonal structure cut)."""
    images, labels = _data(12, np.random.default_rng(4))
    x = images[labels == 0].reshape(-1, DIM).astype(np.float64)
    full, low = fit_gaussian(images, labels, 2, rank=0), fit_gaussian(images, labels, 2, rank=2)
    assert full.rank == 11 and low.rank == 2  # 12 images span 11 directions
    sample_cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(full.covariance(0), sample_cov, atol=1e-2)
    np.testing.assert_allclose(full.resid_std[0], 0.0, atol=1e-2)
    np.testing.assert_allclose(np.diag(low.covariance(0)), np.diag(sample_cov), rtol=1e-3, atol=1e-2)
    assert np.abs(low.covariance(0) - sample_cov).max() > 10.0
    with pytest.raises(GaussianError, match="gaussian_rank"):
        fit_gaussian(images, labels, 2, rank=DIM + 1)


def test_the_default_fit_follows_generate_gaussian_rank(tmp_path):
    from raylab.presets import make_config
    from raylab.pipeline.generators import GENERATORS

    paths = {rank: GENERATORS["gaussian"].default(make_config("tiny", {"generate.gaussian_rank": rank}), tmp_path)
             for rank in (0, 3)}
    assert paths[0] != paths[3] and "full" in paths[0].name  # a store never reuses a fit of another rank
    assert load_gaussian(paths[3]).rank == 3 and load_gaussian(paths[0]).rank > 3
