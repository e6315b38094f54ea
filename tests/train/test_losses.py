"""Training losses: TRADES as the reference computes it, PGD-AT, CE, stability; smooth CE; BN bookkeeping."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raylab.config import AttackConfig, TrainConfig
from raylab.models import create_model
from raylab.train.losses import LOSSES, LossConfigError, get_loss, smooth_ce

K = 4
ATTACK = AttackConfig(eps=8 / 255, step=2 / 255, steps=3)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, K)).train()


def batch(n=16, size=8, classes=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def run(name, model, x, y, seed=0, attack=ATTACK, **cfg):
    cfg = TrainConfig(**{"loss": name, **cfg})
    return LOSSES[name](model, x, y, cfg=cfg, attack=attack, generator=torch.Generator().manual_seed(seed))


def bn_buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_registry_keys_equal_config_choices():
    choices = next(f for f in dataclasses.fields(TrainConfig) if f.name == "loss").metadata["choices"]
    assert set(LOSSES) == set(choices)
    with pytest.raises(LossConfigError, match="train.loss: 'mart' is not one of"):
        get_loss("mart")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_is_finite_differentiable_and_reports_logits(name):
    model, (x, y) = tiny_net(), batch()
    loss, stats = run(name, model, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert stats["logits_clean"].shape == stats["logits_adv"].shape == (16, K)
    assert not any(v.requires_grad for v in stats.values()) and model.training


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_same_generator_same_loss(name):
    x, y = batch()
    a, sa = run(name, tiny_net(), x, y, seed=3)
    b, sb = run(name, tiny_net(), x, y, seed=3)
    assert torch.equal(a, b) and torch.equal(sa["x_adv"], sb["x_adv"])


@pytest.mark.parametrize("s", [0.0, 0.1, 1.0])
def test_smooth_ce_matches_the_reference_formula(s):
    logits, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 5
    log_p = F.log_softmax(logits, 1)
    by_hand = ((1 - s) * -log_p[torch.arange(8), y] + s * -log_p.mean(1)).mean()
    assert torch.allclose(smooth_ce(logits, y, s), by_hand)
    assert torch.allclose(smooth_ce(logits, y, s), F.cross_entropy(logits, y, label_smoothing=s))
    assert torch.allclose(smooth_ce(logits, F.one_hot(y, 5).float(), s), smooth_ce(logits, y, s))


def test_smooth_ce_soft_targets_and_errors():
    logits = torch.randn(4, 3)
    mix = torch.tensor([[0.7, 0.3, 0.0]] * 4)  # a MixUp target
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    expected = 0.7 * smooth_ce(logits, zeros) + 0.3 * smooth_ce(logits, ones)
    assert torch.allclose(smooth_ce(logits, mix), expected)
    with pytest.raises(LossConfigError, match="loss target"):
        smooth_ce(logits, torch.zeros(4, 2))
    with pytest.raises(LossConfigError, match="label_smoothing"):
        smooth_ce(logits, torch.zeros(4, dtype=torch.long), 1.5)


def test_trades_with_beta_zero_is_smooth_ce_of_clean_logits():
    model, (x, y) = tiny_net(), batch()
    reference = copy.deepcopy(model)
    loss, stats = run("trades", model, x, y, beta=0.0, label_smoothing=0.1)
    assert torch.allclose(loss, smooth_ce(reference(x), y, 0.1), atol=1e-6)
    assert stats["loss_robust"] > 0  # the KL term is still computed, only weighted by 0


def test_trades_kl_term_is_nonnegative_and_zero_without_perturbation():
    model, (x, y) = tiny_net(), batch()
    _, stats = run("trades", model, x, y, beta=6.0)
    assert stats["loss_robust"] > 0
    _, stats = run("trades", model, x, y, beta=6.0, attack=AttackConfig(eps=0.0, step=0.0, steps=3))
    assert torch.equal(stats["x_adv"], x) and abs(stats["loss_robust"].item()) < 1e-7
    loss, stats = run("trades", model, x, y, beta=6.0, label_smoothing=0.0)
    assert torch.allclose(loss, stats["loss_natural"] + 6.0 * stats["loss_robust"])


def test_trades_kl_gradient_flows_into_the_clean_side():
    """Reference: the clean softmax inside the outer KL is NOT detached (training_recipe.md §1)."""
    model, (x, y) = tiny_net(), batch()
    _, stats = run("trades", model, x, y)
    clean = model(x)
    adv = model(stats["x_adv"])
    kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
    (g_clean,) = torch.autograd.grad(kl, clean)
    assert g_clean.abs().sum() > 0


@pytest.mark.parametrize("name", ["trades", "stability"])
def test_missing_beta_is_an_error_not_pgd_at(name):
    calls = []
    model = tiny_net()
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = batch()
    cfg = TrainConfig(loss="pgd_at", beta=None)  # a config valid for PGD-AT, handed to a beta loss
    with pytest.raises(LossConfigError, match=f"train.beta: required by train.loss={name}"):
        LOSSES[name](model, x, y, cfg=cfg, attack=ATTACK, generator=None)
    assert not calls


@pytest.mark.parametrize("attack_bn", ["train_frozen", "eval"])
@pytest.mark.parametrize("name", ["trades", "pgd_at"])
def test_attack_forwards_leave_bn_running_stats_alone(name, attack_bn):
    """Running stats move exactly as two (TRADES) or one (PGD-AT) plain train-mode forwards would move them."""
    model, (x, y) = tiny_net(), batch()
    replay = copy.deepcopy(model)
    _, stats = run(name, model, x, y, attack_bn=attack_bn)
    with torch.no_grad():
        for inputs in ([x, stats["x_adv"]] if name == "trades" else [stats["x_adv"]]):
            replay(inputs)
    after, expected = bn_buffers(model), bn_buffers(replay)
    assert after["1.num_batches_tracked"].item() == (2 if name == "trades" else 1)
    assert all(torch.allclose(after[k], expected[k], atol=1e-7, rtol=0) for k in after)
    assert model.training and model[1].track_running_stats


def test_trades_reference_logits_equal_a_frozen_bn_forward():
    """train_frozen reuses the outer clean logits as the attack's target: same numbers as the reference's
    separate `track_bn_stats(False)` forward, because train-mode BN normalizes with batch statistics."""
    from raylab.attacks import frozen_bn

    model, (x, y) = tiny_net(), batch()
    frozen = copy.deepcopy(model)
    _, stats = run("trades", model, x, y)
    with torch.no_grad(), frozen_bn(frozen):
        assert torch.allclose(frozen(x), stats["logits_clean"], atol=1e-6)


def test_pgd_at_uses_adversarial_logits_and_soft_targets():
    model, (x, y) = tiny_net(), batch()
    loss, stats = run("pgd_at", model, x, y, label_smoothing=0.0)
    assert torch.allclose(loss, F.cross_entropy(stats["logits_adv"], y), atol=1e-6)
    soft = 0.5 * F.one_hot(y, K).float() + 0.5 * F.one_hot((y + 1) % K, K).float()
    for name in ("pgd_at", "trades"):
        assert torch.isfinite(run(name, tiny_net(), x, soft)[0])


def test_stability_noise_has_sigma_and_is_not_clamped():
    model, (x, y) = tiny_net(), batch(n=64)
    _, stats = run("stability", model, x, y, noise_sigma=0.25, beta=6.0)
    noise = stats["x_adv"] - x
    assert noise.std().item() == pytest.approx(0.25, rel=0.05) and abs(noise.mean().item()) < 0.01
    assert stats["x_adv"].min() < 0 and stats["x_adv"].max() > 1
    assert stats["loss_robust"] > 0


def test_ce_has_no_attack():
    model, (x, y) = tiny_net(), batch()
    loss, stats = run("ce", model, x, y, label_smoothing=0.0)
    assert torch.equal(stats["logits_adv"], stats["logits_clean"]) and torch.equal(stats["x_adv"], x)
    assert torch.allclose(loss, F.cross_entropy(stats["logits_clean"], y))


def test_a_few_trades_steps_on_wrn_16_2_reduce_the_loss():
    """SGD on one fixed batch of digit-like images (blobs of 10 fixed patterns): the TRADES loss falls."""
    torch.manual_seed(0)
    model = create_model("wrn-16-2", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3).train()
    g = torch.Generator().manual_seed(0)
    patterns = (torch.rand(10, 1, 32, 32, generator=g) > 0.6).float().expand(10, 3, 32, 32)
    y = torch.arange(4)
    x = (0.1 + 0.8 * patterns[y] + 0.05 * torch.randn(4, 3, 32, 32, generator=g)).clamp(0, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    attack = AttackConfig(eps=8 / 255, step=8 / 255, steps=1)  # tiny on purpose: 2 CPU cores
    losses = []
    for step in range(3):
        loss, _ = run("trades", model, x, y, seed=step, attack=attack, beta=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.93 * losses[0], losses  # measured: 2.314 -> 2.001
