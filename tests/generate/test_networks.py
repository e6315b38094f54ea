"""SongUNet / preconditioning layout against the official counts and names (edm.md §2–§3), and the EDM loss."""
import dataclasses
import math
import time

import pytest
import torch

from raylab.config import EDMConfig
from raylab.presets import make_config
from raylab.generate.loss import EDMLoss, ema_beta, lr_warmup
from raylab.generate.networks import (EDMPrecond, NetworkConfigError, VEPrecond, VPPrecond, build_edm, edm_kwargs,
                                      make_network)



def _meta_net(**overrides):
    """A full-size network on the meta device: parameters have shapes but no storage, so building is instant."""
    with torch.device("meta"):
        return build_edm(EDMConfig(**overrides))


def _tiny_cfg(**overrides) -> EDMConfig:
    return dataclasses.replace(make_config("tiny").edm, **overrides)


@pytest.mark.parametrize("overrides, params, tensors", [
    (dict(arch="ddpmpp"), 55_735_299, 427),
    (dict(arch="ddpmpp", conditional=False), 55_733_891, 425),
    (dict(arch="ncsnpp"), 56_400_643, 434),
])
def test_cifar10_parameter_counts_match_the_official_networks(overrides, params, tensors):
    net = _meta_net(**overrides)
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == tensors


def test_ddpmpp_state_dict_names_and_shapes():
    sd = _meta_net().state_dict()
    buffers = [k for k in sd if k.endswith("resample_filter")]
    assert len(sd) - len(buffers) == 419 and len(buffers) == 8
    assert all(sd[k].shape == (1, 1, 2, 2) for k in buffers)
    expected = {
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.dec.32x32_block4.conv0.weight": (256, 384, 3, 3),
        "model.dec.8x8_block0.conv0.weight": (256, 512, 3, 3),
        "model.map_label.weight": (128, 10), "model.map_label.bias": (128,),
        "model.map_augment.weight": (128, 9),
        "model.map_layer0.weight": (512, 128), "model.map_layer1.weight": (512, 512),
        "model.dec.32x32_aux_norm.weight": (256,), "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
        "model.enc.16x16_down.skip.resample_filter": (1, 1, 2, 2),
        "model.dec.8x8_in0.proj.weight": (256, 256, 1, 1),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "model.map_augment.bias" not in sd and "model.dec.16x16_block3.qkv.weight" not in sd
    assert "model.dec.16x16_block4.qkv.weight" in sd  # attention only in the last block of a decoder level


def test_ncsnpp_adds_fourier_freqs_residual_encoder_and_4tap_filters():
    sd = _meta_net(arch="ncsnpp").state_dict()
    expected = {"model.map_noise.freqs": (128,), "model.enc.16x16_aux_residual.weight": (256, 3, 3, 3),
                "model.enc.8x8_aux_residual.weight": (256, 256, 3, 3), "model.map_label.weight": (256, 10),
                "model.map_layer0.weight": (512, 256), "model.enc.8x8_down.conv0.resample_filter": (1, 1, 4, 4)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected


def test_builder_emits_the_official_init_kwargs():
    kwargs = edm_kwargs(EDMConfig())
    official = dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, model_type="SongUNet",
                    embedding_type="positional", encoder_type="standard", decoder_type="standard",
                    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                    augment_dim=9, dropout=0.13)
    assert {k: kwargs[k] for k in official} == official
    assert edm_kwargs(EDMConfig(conditional=False))["label_dim"] == 0
    assert type(_meta_net(precond="vp")) is VPPrecond and type(_meta_net(precond="ve")) is VEPrecond


def test_resample_filter_values():
    net = build_edm(_tiny_cfg())
    assert torch.equal(net.model.enc["16x16_down"].conv0.resample_filter, torch.full((1, 1, 2, 2), 0.25))
    f = build_edm(_tiny_cfg(arch="ncsnpp")).model.enc["16x16_aux_residual"].resample_filter[0, 0]
    taps = torch.tensor([1.0, 3, 3, 1])
    assert torch.allclose(f, torch.outer(taps, taps) / 64)


def test_tiny_forward_shape_labels_and_speed():
    net = build_edm(_tiny_cfg(augment_dim=9)).eval()
    x, labels = torch.randn(4, 3, 32, 32), torch.eye(10)[[0, 1, 2, 3]]
    with torch.no_grad():
        net(x, torch.tensor(1.0), labels)  # warm-up
        start = time.perf_counter()
        out = net(x, torch.tensor(1.0), labels)
        elapsed = time.perf_counter() - start
        other = net(x, torch.tensor(1.0), torch.eye(10)[[5, 5, 5, 5]])
        aug = net(x, torch.full((4,), 1.0), labels, augment_labels=torch.ones(4, 9))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, other) and not torch.equal(out, aug)
    assert elapsed < 2.0, f"tiny forward took {elapsed:.2f}s"


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_edm(_tiny_cfg(seed=3)), build_edm(_tiny_cfg(seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_edm(_tiny_cfg(seed=4))
    assert not torch.equal(a.model.enc["32x32_conv"].weight, c.model.enc["32x32_conv"].weight)


def test_edm_coefficients_and_sigma_ranges():
    net = build_edm(_tiny_cfg())
    c_skip, c_out, c_in, c_noise = net.coefficients(torch.tensor(0.5))
    assert (float(c_skip), float(c_out), float(c_in)) == pytest.approx((0.5, 0.25 / math.sqrt(0.5), math.sqrt(2)))
    assert float(c_noise) == pytest.approx(math.log(0.5) / 4)
    assert (net.sigma_min, net.sigma_max, net.sigma_data) == (0, math.inf, 0.5)
    vp = build_edm(_tiny_cfg(precond="vp"))
    # σ(1e-5) in float32, as the reference computes it: exp(1e-6) − 1 rounds to 2⁻²⁰, so σ_min = 2⁻¹⁰ ≈ 0.00098.
    assert vp.sigma_min == 2 ** -10 and vp.sigma_max == pytest.approx(152.2, rel=1e-3)
    assert float(vp.sigma_inv(vp.sigma(torch.tensor(0.3)))) == pytest.approx(0.3)
    ve = build_edm(_tiny_cfg(precond="ve"))
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)


def test_bad_arguments_fail_before_building():
    with pytest.raises(NetworkConfigError, match="embedding_type: 'sinusoid'"):
        EDMPrecond(32, 3, model_channels=16, embedding_type="sinusoid")
    with pytest.raises(NetworkConfigError, match="model_type: 'DhariwalUNet'"):
        EDMPrecond(32, 3, model_type="DhariwalUNet")
    with pytest.raises(NetworkConfigError, match="network class: 'Foo'"):
        make_network("Foo", {})
    with pytest.raises(NetworkConfigError, match="unexpected keyword"):
        make_network("EDMPrecond", dict(img_resolution=32, img_channels=3, channels=4))


# ---------------------------------------------------------------------------------------------------------------
# EDM loss and training schedules.

def test_loss_of_a_perfect_denoiser_is_zero_and_weights_follow_lambda():
    y = torch.randn(8, 3, 4, 4)
    loss = EDMLoss()(lambda x, sigma, labels, augment_labels=None: y, y, torch.Generator().manual_seed(0))
    assert loss.shape == y.shape and torch.count_nonzero(loss) == 0
    # D = 0 gives λ(σ)·y², and λ(σ) ≥ 1/σ_d² = 4 for every σ.
    zero = EDMLoss()(lambda x, sigma, labels, augment_labels=None: torch.zeros_like(x), y,
                     torch.Generator().manual_seed(0))
    assert torch.all(zero >= 4 * y ** 2 * (1 - 1e-6))


def test_loss_decreases_on_a_tiny_net():
    net = build_edm(_tiny_cfg(model_channels=8, dropout=0.0, conditional=False), img_resolution=8).train()
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn, losses = EDMLoss(), []
    for _ in range(50):
        loss = loss_fn(net, images, torch.Generator().manual_seed(1)).sum() / images.shape[0]  # fixed σ and n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_ema_beta_and_lr_warmup():
    assert ema_beta(512, 10**9, 500, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(512, 100_000, 500, 0.05) == pytest.approx(0.5 ** (512 / 5_000))  # ramp-up caps the half-life
    assert ema_beta(512, 0, 500, 0.05) == 0.0 and ema_beta(512, 0, 500, 0) > 0.99
    assert lr_warmup(1e-3, 5_000_000, 10_000) == pytest.approx(5e-4)
    assert lr_warmup(1e-3, 50_000_000, 10_000) == 1e-3 and lr_warmup(1e-3, 0, 0) == 1e-3
