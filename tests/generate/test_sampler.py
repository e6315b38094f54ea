"""EDM sampler (edm.md §1) and seed-addressed generation: schedule values, NFE, accuracy, bytes per seed."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from raylab.config import GenerateConfig
from raylab.presets import make_config
from raylab.generate.networks import build_edm
from raylab.generate.sampler import (CountingNet, SamplerError, edm_sample, expected_nfe, sample_kwargs,
                                     sigma_schedule, to_uint8)
from raylab.generate.seeds import PerImageNoise, SeedError, generate_images, image_seed, image_seeds, latents

# edm.md §1, N = 20 (printed to 6 significant figures).
SIGMAS_20 = [80, 59.6575, 43.9203, 31.8844, 22.7941, 16.0223, 11.0537, 7.46891, 4.93066, 3.17084, 1.97940,
             1.19431, 0.692824, 0.383855, 0.201404, 0.0989734, 0.0448826, 0.0184008, 0.00662171, 0.002, 0]



@pytest.fixture(scope="module")
def tiny_net():
    """A conditional 16×16 SongUNet with its near-zero output layers perturbed, so labels and inputs matter."""
    cfg = dataclasses.replace(make_config("tiny").edm, model_channels=8, seed=0)
    net = build_edm(cfg, img_resolution=16).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data ~ N(mu, s²): D(x; σ) = mu + s²/(s² + σ²)·(x − mu)."""

    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, mu: float = 0.3, s: float = 0.5):
        super().__init__()
        self.mu, self.s = mu, s

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


# ---------------------------------------------------------------------------------------------------------------
# Schedule and solver.

def test_sigma_schedule_matches_the_reference_values():
    t = sigma_schedule(20)
    assert t.dtype == torch.float64 and len(t) == 21 and t[-1] == 0
    assert [float(f"{v:.6g}") for v in t.tolist()] == SIGMAS_20  # every printed digit agrees
    assert t[:-1].tolist() == pytest.approx(SIGMAS_20[:-1], rel=5e-6)  # half a unit in the 6th digit
    assert sigma_schedule(1).tolist() == [80.0, 0.0]


def test_sigma_schedule_is_clamped_to_the_network_range():
    ve = build_edm(dataclasses.replace(make_config("tiny").edm, precond="ve"))
    t = sigma_schedule(5, net=ve)
    assert t[0] == 80 and t[-2] == pytest.approx(0.02)
    t = sigma_schedule(5, sigma_max=500.0, net=ve)
    assert t[0] == pytest.approx(100.0)


@pytest.mark.parametrize("solver, steps", [("heun", 4), ("euler", 4), ("heun", 1)])
def test_nfe_counts(tiny_net, solver, steps):
    counting = CountingNet(tiny_net)
    edm_sample(counting, torch.randn(3, 3, 16, 16), torch.eye(10)[:3], num_steps=steps, solver=solver)
    assert counting.calls == expected_nfe(steps, solver) == (2 * steps - 1 if solver == "heun" else steps)
    assert counting.image_evals == 3 * counting.calls


def test_heun_is_second_order_on_the_gaussian_probability_flow_ode():
    """For Gaussian data the ODE solution is known: x(0) = mu + (x_T − mu)·s/√(s² + σ_max²). Halving the step
    must cut Heun's error ~4× and Euler's ~2×; a wrong slope or a missing correction breaks both ratios."""
    net, z = GaussianDenoiser(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = net.mu + (80 * z.double() - net.mu) * net.s / math.sqrt(net.s ** 2 + 80 ** 2)

    def error(steps: int, solver: str) -> float:
        out = edm_sample(net, z, num_steps=steps, solver=solver)
        assert out.dtype == torch.float64
        return (out - exact).abs().max().item()

    assert 3.5 < error(25, "heun") / error(50, "heun") < 5
    assert 1.7 < error(50, "euler") / error(100, "euler") < 2.3
    assert error(200, "heun") < 1e-3 and error(50, "heun") < error(50, "euler") / 5


def test_sampling_is_a_pure_function(tiny_net):
    z, labels = torch.randn(2, 3, 16, 16), torch.eye(10)[[1, 7]]
    rng = torch.get_rng_state()
    a = edm_sample(tiny_net, z, labels, num_steps=3)
    b = edm_sample(tiny_net, z, labels, num_steps=3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), rng)
    assert a.shape == z.shape and a.dtype == torch.float64 and torch.isfinite(a).all()


def test_churn_uses_the_noise_fn_and_needs_one(tiny_net):
    z, labels = torch.randn(2, 3, 16, 16), torch.eye(10)[[1, 7]]
    kwargs = dict(num_steps=3, s_churn=10.0, s_min=0.05, s_max=50.0, s_noise=1.003)
    a = edm_sample(tiny_net, z, labels, noise_fn=PerImageNoise([1, 2]), **kwargs)
    b = edm_sample(tiny_net, z, labels, noise_fn=PerImageNoise([1, 2]), **kwargs)
    c = edm_sample(tiny_net, z, labels, noise_fn=PerImageNoise([3, 4]), **kwargs)
    plain = edm_sample(tiny_net, z, labels, num_steps=3)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    with pytest.raises(SamplerError, match="noise_fn"):
        edm_sample(tiny_net, z, labels, **kwargs)


def test_bad_sampler_arguments_fail_before_compute(tiny_net):
    z = torch.randn(1, 3, 16, 16)
    with pytest.raises(SamplerError, match="solver: 'rk4'"):
        edm_sample(tiny_net, z, num_steps=3, solver="rk4")
    with pytest.raises(SamplerError, match="num_steps: 0"):
        edm_sample(tiny_net, z, num_steps=0)
    with pytest.raises(SamplerError, match="sigma_min"):
        sigma_schedule(5, sigma_min=1.0, sigma_max=0.5)


def test_to_uint8_is_the_reference_conversion():
    x = torch.tensor([-1.5, -1.0, 0.0, 1 / 255, 0.999, 1.0, 2.0], dtype=torch.float64).reshape(1, 1, 1, 7)
    out = to_uint8(x.expand(1, 3, 1, 7))
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 128, 255, 255, 255]


def test_sample_kwargs_come_from_the_config(tiny_net):
    cfg = GenerateConfig(steps=2, solver="euler", s_churn=1.0)
    kwargs = sample_kwargs(cfg)
    assert kwargs["num_steps"] == 2 and kwargs["solver"] == "euler" and kwargs["s_max"] == math.inf
    counting = CountingNet(tiny_net)
    edm_sample(counting, torch.randn(1, 3, 16, 16), torch.eye(10)[:1], noise_fn=PerImageNoise([0]), **kwargs)
    assert counting.calls == 2


# ---------------------------------------------------------------------------------------------------------------
# Seeds: an image's bytes depend only on (dataset seed, class, index).

def test_image_seeds_are_stable_63_bit_and_mode_dependent():
    assert image_seed(0, 0, 0) == 1241944011957848429  # pinned: changing the seed plan changes every dataset
    seeds = {image_seed(7, c, i) for c in range(10) for i in range(100)}
    assert len(seeds) == 1000 and max(seeds) < 2 ** 63
    assert image_seed(7, 3, 5, "shared") == image_seed(7, 4, 5, "shared") != image_seed(8, 3, 5, "shared")
    assert image_seed(7, 3, 5) != image_seed(7, 3, 5, "shared")
    with pytest.raises(SeedError, match="seed mode: 'reuse'"):
        image_seed(0, 0, 0, "reuse")
    with pytest.raises(SeedError, match="image index: -1"):
        image_seed(0, 0, -1)


def test_latents_are_per_image():
    a = latents([11, 12, 13], (3, 4, 4))
    assert a.shape == (3, 3, 4, 4)
    assert torch.equal(a[1], latents([12], (3, 4, 4))[0])
    assert torch.equal(a[1], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(12)))


def test_bytes_do_not_depend_on_batch_size_or_chunking(tiny_net):
    seeds, labels = image_seeds(0, 3, range(32)), np.arange(32) % 10
    kwargs = dict(num_steps=2)
    ref, out_labels = generate_images(tiny_net, seeds, labels, kwargs, batch_size=32)
    assert ref.shape == (32, 16, 16, 3) and ref.dtype == np.uint8 and ref.std() > 10
    assert np.array_equal(out_labels, labels)
    for batch_size in (1, 7):
        assert np.array_equal(generate_images(tiny_net, seeds, labels, kwargs, batch_size=batch_size)[0], ref)
    parts = [generate_images(tiny_net, seeds[a:b], labels[a:b], kwargs, batch_size=5)[0]
             for a, b in [(0, 3), (3, 20), (20, 32)]]
    assert np.array_equal(np.concatenate(parts), ref)


def test_churned_bytes_do_not_depend_on_batch_size(tiny_net):
    seeds, labels = image_seeds(1, 0, range(6)), [0, 1, 2, 3, 4, 5]
    kwargs = dict(num_steps=2, s_churn=5.0)
    ref = generate_images(tiny_net, seeds, labels, kwargs, batch_size=6)[0]
    assert np.array_equal(generate_images(tiny_net, seeds, labels, kwargs, batch_size=4)[0], ref)
    assert not np.array_equal(generate_images(tiny_net, seeds, labels, dict(num_steps=2))[0], ref)


def test_shared_and_disjoint_modes_and_labels(tiny_net):
    shared = [image_seed(0, c, 0, "shared") for c in (2, 5)]
    disjoint = [image_seed(0, c, 0) for c in (2, 5)]
    assert shared[0] == shared[1] and disjoint[0] != disjoint[1]
    images, _ = generate_images(tiny_net, shared + disjoint, [2, 5, 2, 5], dict(num_steps=2))
    assert not np.array_equal(images[0], images[1])  # same latent, different class: the label is honoured
    assert np.array_equal(images[2], generate_images(tiny_net, disjoint[:1], [2], dict(num_steps=2))[0][0])


def test_bad_labels_fail_before_compute(tiny_net):
    with pytest.raises(SeedError, match=r"labels: values must be in \[0, 9\]"):
        generate_images(tiny_net, [1, 2], [0, 10], dict(num_steps=2))
    with pytest.raises(SeedError, match="2 labels for 3 seeds"):
        generate_images(tiny_net, [1, 2, 3], [0, 1], dict(num_steps=2))
    with pytest.raises(SeedError, match="label_dim=10"):
        generate_images(tiny_net, [1], None, dict(num_steps=2))


def test_unconditional_generation_returns_minus_one_labels():
    cfg = dataclasses.replace(make_config("tiny").edm, model_channels=8, conditional=False)
    net = build_edm(cfg, img_resolution=8).eval()
    images, labels = generate_images(net, [5, 6], None, dict(num_steps=2))
    assert images.shape == (2, 8, 8, 3) and labels.tolist() == [-1, -1]
