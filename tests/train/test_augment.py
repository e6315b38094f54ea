"""Batch augmentations: shapes/ranges, determinism, crop/flip geometry, mixing targets, no global RNG."""
import time

import pytest
import torch
import torch.nn.functional as F

from raylab.config import TrainConfig
from raylab.knobs import ConfigError
from raylab.train import augment as aug
from raylab.train.augment import AUGMENTS, CROP_PAD, CUTOUT_SIZE, augment, crop_flip_images, crop_images, is_soft


def _batch(n=16, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 0.9 + 0.05, torch.randint(0, 10, (n,), generator=g)


def _gen(seed=123):
    return torch.Generator().manual_seed(seed)


def test_registry_matches_config_choices():
    choices = {f.metadata["choices"] for f in TrainConfig.__dataclass_fields__.values() if f.name == "augment"}
    assert set(AUGMENTS) == set(next(iter(choices)))


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_shapes_ranges_and_determinism(name):
    x, y = _batch()
    out, target = augment(name, x, y, 10, _gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    if is_soft(name):
        assert target.shape == (16, 10) and target.dtype == x.dtype
        assert torch.allclose(target.sum(1), torch.ones(16))
    else:
        assert target.dtype == torch.int64 and torch.equal(target, y)
    again, target2 = augment(name, x, y, 10, _gen())
    assert torch.equal(out, again) and torch.equal(target, target2)
    if name != "none":
        other, _ = augment(name, x, y, 10, _gen(seed=999))
        assert not torch.equal(out, other)


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_no_global_rng_used(name):
    x, y = _batch()
    state = torch.random.get_rng_state()
    augment(name, x, y, 10, _gen())
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_channels_last_layout_is_kept(name):
    x, y = _batch(n=4)
    out, target = augment(name, x.contiguous(memory_format=torch.channels_last), y, 10, _gen())
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref, ref_target = augment(name, x, y, 10, _gen())
    assert torch.equal(out, ref) and torch.equal(target, ref_target)


def _matching_window(padded, out):
    """(dy, dx, flipped) of the window of `padded` equal to `out`, or None."""
    h, w = out.shape[-2:]
    for dy in range(2 * CROP_PAD + 1):
        for dx in range(2 * CROP_PAD + 1):
            win = padded[:, dy:dy + h, dx:dx + w]
            if torch.equal(win, out):
                return dy, dx, False
            if torch.equal(win.flip(-1), out):
                return dy, dx, True
    return None


def test_crop_is_a_shifted_window_of_the_padded_image_and_flips_happen():
    x, _ = _batch(n=64, h=8, w=10)  # non-square on purpose
    out = crop_flip_images(x, _gen())
    padded = F.pad(x, (CROP_PAD,) * 4)
    found = [_matching_window(padded[i], out[i]) for i in range(len(x))]
    assert all(f is not None for f in found)
    flips = sum(f[2] for f in found)
    assert 16 < flips < 48  # p = 0.5 over 64 images
    assert len({(dy, dx) for dy, dx, _ in found}) > 20  # offsets spread over the 9 x 9 choices


def test_flip_actually_flips():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(200, 1, 1, 4).contiguous() / 4
    out = crop_flip_images(x, _gen(), pad=0)  # no padding: the only randomness left is the flip
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped | kept) and 60 < int(flipped.sum()) < 140


def test_crop_never_mirrors_and_is_a_shifted_window_of_the_padded_image():
    x, _ = _batch(n=64, h=8, w=10)
    out, _ = augment("crop", x, torch.zeros(64, dtype=torch.long), 10, _gen())
    padded = F.pad(x, (CROP_PAD,) * 4)
    found = [_matching_window(padded[i], out[i]) for i in range(len(x))]
    assert all(f is not None and not f[2] for f in found)  # every image is an unflipped window
    assert len({(dy, dx) for dy, dx, _ in found}) > 20
    assert torch.equal(crop_images(x, _gen(), pad=0), x)  # no padding, no flip: nothing changes


def test_crop_has_the_same_windows_as_crop_flip():
    """Same draws for the offsets (rows, columns first): crop_flip is crop, then a mirror of some images."""
    x, _ = _batch(n=64)
    crop, flipped = crop_images(x, _gen()), crop_flip_images(x, _gen())
    same = (flipped == crop).flatten(1).all(1)
    mirrored = (flipped == crop.flip(-1)).flatten(1).all(1)
    assert torch.all(same | mirrored) and 16 < int(mirrored.sum()) < 48


def test_cutout_zeroes_one_clipped_square():
    x = torch.ones(200, 3, 32, 32)
    out, _ = augment("cutout", x, torch.zeros(200, dtype=torch.long), 10, _gen())
    holes = (out == 0).all(1)  # zero on every channel
    crop_zeros = (crop_flip_images(x, _gen()) == 0).all(1)  # the crop's own padding, same draws
    hole_area = (holes & ~crop_zeros).flatten(1).sum(1)
    assert hole_area.max() <= CUTOUT_SIZE**2 and (hole_area == CUTOUT_SIZE**2).any() and (hole_area > 0).all()


def test_cutmix_pastes_one_rectangle_and_target_matches_its_area():
    x, y = _batch(n=64)
    out, target = augment("cutmix", x, y, 10, _gen())
    ref_gen = _gen()  # replay the draws in order: crop_flip, lambda, partner, box centre
    base = crop_flip_images(x, ref_gen)
    lam = aug._rand(64, ref_gen, x.device)
    partner = aug._randperm(64, ref_gen, x.device)
    side = (1 - lam).sqrt()
    mask = aug._random_box((32 * side).long(), (32 * side).long(), 32, 32, ref_gen)
    assert torch.equal(out, torch.where(mask[:, None], base[partner], base))
    rows, cols = mask.any(2), mask.any(1)
    assert torch.equal(mask, rows[:, :, None] & cols[:, None, :])  # one axis-aligned rectangle per image
    pasted = mask.flatten(1).float().mean(1)
    expect = (1 - pasted)[:, None] * F.one_hot(y, 10) + pasted[:, None] * F.one_hot(y[partner], 10)
    assert torch.allclose(target, expect, atol=1e-6)
    # boxes not clipped by the border have area fraction 1 - lambda up to the integer side rounding
    full = (rows.sum(1) == (32 * side).long()) & (cols.sum(1) == (32 * side).long())
    assert full.sum() > 5 and torch.allclose(pasted[full], (1 - lam[full]), atol=2 * 32 / 1024 + 1e-6)
    assert ((pasted > 0) & (pasted < 1)).sum() > 32


def test_mixup_target_matches_lambda():
    x, y = _batch(n=32)
    out, target = augment("mixup", x, y, 10, _gen())
    ref_gen = _gen()
    base = crop_flip_images(x, ref_gen)
    lam = aug._beta(aug.MIXUP_ALPHA, 32, ref_gen, x.device)
    partner = aug._randperm(32, ref_gen, x.device)
    assert torch.allclose(out, lam[:, None, None, None] * base + (1 - lam[:, None, None, None]) * base[partner],
                          atol=1e-6)
    expect = lam[:, None] * F.one_hot(y, 10) + (1 - lam[:, None]) * F.one_hot(y[partner], 10)
    assert torch.allclose(target, expect, atol=1e-6)
    # small alpha: most lambdas near 0 or 1 (Rebuffi et al. Fig. 9a prefer small alpha)
    assert ((lam < 0.1) | (lam > 0.9)).float().mean() > 0.5


def test_bad_inputs():
    x, y = _batch(n=4)
    with pytest.raises(ConfigError, match="train.augment"):
        augment("autoaugment", x, y, 10, _gen())
    with pytest.raises(ValueError, match="float"):
        augment("crop_flip", (x * 255).to(torch.uint8), y, 10, _gen())
    with pytest.raises(ValueError, match="labels"):
        augment("crop_flip", x, y[:2], 10, _gen())
    with pytest.raises(ValueError, match="generator"):
        augment("crop_flip", x, y, 10, 0)


def test_crop_flip_timing_note(capsys):
    """Not an assertion: time crop_flip on 512 CIFAR-sized images (printed with -s)."""
    x, _ = _batch(n=512)
    g = _gen()
    crop_flip_images(x, g)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        crop_flip_images(x, g)
        times.append(time.perf_counter() - t0)
    with capsys.disabled():
        print(f"\ncrop_flip on 512x3x32x32 (CPU, {torch.get_num_threads()} threads): "
              f"min {min(times) * 1e3:.1f} ms, median {sorted(times)[5] * 1e3:.1f} ms per batch")
