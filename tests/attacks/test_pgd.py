"""PGD and its primitives: feasibility, strength, determinism, the mode contexts, one-line errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raylab.attacks import ATTACK_MODES, NORMS, OBJECTIVES, AttackError, eval_mode, frozen_bn, pgd
from raylab.attacks.ops import init_l2, init_linf, project_l2, project_linf

BUDGETS = {"linf": dict(eps=8 / 255, step=2 / 255), "l2": dict(eps=0.5, step=0.125)}
K = 4  # classes


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, K))


def separable_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a fixed random 8x8 RGB pattern around 0.5, plus small noise; inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(K, 3, 8, 8, generator=torch.Generator().manual_seed(123)) - 0.5
    y = torch.randint(0, K, (n,), generator=g)
    x = (0.5 + 0.3 * patterns[y] + 0.05 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A small conv net fitted on separable data (clean accuracy ~100%), then put in eval mode."""
    torch.manual_seed(0)
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = separable_data(128, seed=1)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = separable_data(64, seed=2)
    assert (model(xt).argmax(1) == yt).float().mean() > 0.9
    return model, xt, yt


def per_sample_ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def attack(model, x, y, norm="linf", steps=10, seed=0, **kw):
    ref = model(x).detach()
    return pgd(model, x, y, norm=norm, steps=steps, generator=torch.Generator().manual_seed(seed),
               ref_logits=ref, **{**BUDGETS[norm], **kw})


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_stays_in_the_ball_and_in_range(trained, norm, objective):
    model, x, y = trained
    x_adv = attack(model, x, y, norm, objective=objective)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= BUDGETS[norm]["eps"] * (1 + 1e-5) + 1e-7).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
    assert (size > 0.5 * BUDGETS[norm]["eps"]).float().mean() > 0.9  # it does move to the boundary


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_raises_the_loss_over_clean_and_random_noise(trained, norm):
    model, x, y = trained
    noise = attack(model, x, y, norm, steps=0)  # random point of the ball, no gradient steps
    x_adv = attack(model, x, y, norm)
    clean, rand, adv = (per_sample_ce(model, v, y).mean() for v in (x, noise, x_adv))
    assert adv > 2 * rand and adv > 2 * clean
    assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()


def test_kl_and_margin_objectives_increase_their_loss(trained):
    model, x, y = trained
    ref = model(x).detach()
    for objective in ("kl", "margin"):
        before = OBJECTIVES[objective](model(attack(model, x, y, steps=0)), y, ref)
        after = OBJECTIVES[objective](model(attack(model, x, y, objective=objective)), y, ref)
        assert after > before


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_same_generator_same_result_and_global_rng_untouched(trained, norm):
    model, x, y = trained
    state = torch.get_rng_state()
    a, b = attack(model, x, y, norm, seed=7), attack(model, x, y, norm, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, attack(model, x, y, norm, seed=8, steps=0))


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_a_given_start_is_the_random_start_of_its_images(trained, norm):
    """`start` (drawn beforehand for a whole set) replaces the draw: the same numbers give the same attack, and
    each image keeps its start when it is attacked alone (what validation on several ranks relies on)."""
    model, x, y = trained
    start = NORMS[norm].init(x, BUDGETS[norm]["eps"], torch.Generator().manual_seed(7))
    assert torch.equal(attack(model, x, y, norm, steps=0, start=start), (x + start).clamp(0, 1))
    assert torch.equal(attack(model, x, y, norm, seed=3, start=start), attack(model, x, y, norm, seed=7))
    for steps in (0, 3):
        alone = torch.cat([attack(model, x[i:i + 1], y[i:i + 1], norm, steps=steps, start=start[i:i + 1])
                           for i in range(4)])
        together = attack(model, x[:4], y[:4], norm, steps=steps, start=start[:4])
        # After gradient steps, up to the float rounding of a forward pass, which depends on the batch size
        torch.testing.assert_close(alone, together, rtol=0, atol=0 if steps == 0 else 1e-6)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_eps_zero_returns_x(trained, norm):
    model, x, y = trained
    assert torch.equal(attack(model, x, y, norm, eps=0.0), x)
    assert torch.equal(attack(model, x, y, norm, steps=0, random_start=False), x)


def test_leaves_model_mode_and_parameter_grads_alone(trained):
    model, x, y = trained
    model = copy.deepcopy(model).train()
    before = copy.deepcopy(model.state_dict())
    with frozen_bn(model):
        attack(model, x, y, steps=2)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bn_flags(model):
    return [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]


@pytest.mark.parametrize("context", [frozen_bn, eval_mode])
def test_mode_contexts_restore_exactly_even_on_error(trained, context):
    model, x, y = trained
    model = copy.deepcopy(model).eval()
    model[1].train()  # a mixed state must come back as it was, not as model.train()/eval()
    flags = _bn_flags(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(RuntimeError, match="boom"):
        with context(model):
            assert all(m.training == (context is frozen_bn) for m in model.modules())
            model(x)
            raise RuntimeError("boom")
    assert _bn_flags(model) == flags
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # num_batches_tracked too


def test_frozen_bn_uses_batch_statistics(trained):
    model, x, y = trained
    model = copy.deepcopy(model)
    with torch.no_grad():
        with eval_mode(model):
            running = model(x)
        with frozen_bn(model):
            batch = model(x)
        model.train()
        expected = model(x)  # plain train mode: batch statistics (and a running-stat update)
    assert torch.allclose(batch, expected, atol=1e-6) and not torch.allclose(batch, running, atol=1e-3)
    assert set(ATTACK_MODES) == {"train_frozen", "eval"}


def test_ops_primitives():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    assert init_linf(x, 0.1, g).abs().max() <= 0.1
    norms = init_l2(x, 0.5, g).flatten(1).norm(dim=1)
    assert (norms <= 0.5 + 1e-6).all() and (norms > 0.45).all()  # uniform in a 192-d ball: near the sphere
    big = torch.randn(16, 3, 8, 8, generator=g)
    assert torch.allclose(project_l2(big, 0.5).flatten(1).norm(dim=1), torch.full((16,), 0.5))
    small = 1e-3 * big
    assert torch.equal(project_l2(small, 0.5), small) and torch.equal(project_linf(small, 0.5), small)
    assert project_linf(big, 0.1).abs().max() == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="l3"), "attack norm: 'l3' is not one of linf, l2"),
    (dict(objective="hinge"), "attack objective: 'hinge' is not one of ce, kl, margin"),
    (dict(eps=-0.1), "attack eps/step: -0.1/"),
    (dict(steps=2.5), "attack steps: 2.5 must be an int >= 0"),
    (dict(objective="kl", ref_logits=None), "attack objective 'kl': needs ref_logits"),
    (dict(start=torch.zeros(2, 3, 8, 8)), "attack start: shape \\(2, 3, 8, 8\\) must be the images' \\(4, 3, 8, 8\\)"),
])
def test_bad_arguments_raise_before_any_forward(kwargs, message):
    calls = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K))
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = separable_data(4, seed=0)
    args = {**dict(norm="linf", eps=0.1, step=0.01, steps=3, ref_logits=torch.zeros(4, K)), **kwargs}
    with pytest.raises(AttackError, match=message):
        pgd(model, x, y, **args)
    assert not calls


def test_labels_are_checked():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K))
    x, y = separable_data(4, seed=0)
    soft = F.one_hot(y, K).float()
    assert pgd(model, x, soft, norm="linf", eps=0.1, step=0.01, steps=1).shape == x.shape  # MixUp targets, CE
    with pytest.raises(AttackError, match="attack labels"):
        pgd(model, x, soft, norm="linf", eps=0.1, step=0.01, steps=1, objective="margin")
    with pytest.raises(AttackError, match="attack labels"):
        pgd(model, x, y[:2], norm="linf", eps=0.1, step=0.01, steps=1)


def test_unset_step_follows_the_reference_per_norm(trained):
    """L-inf: eps/4 (the papers' 2/255 at 8/255); L2: 2·eps/steps, the reference's l2-pgd, not 2/255 for every
    norm. An unset step equals passing that step explicitly."""
    from raylab.attacks.pgd import default_step

    assert default_step("linf", 8 / 255, 10) == pytest.approx(2 / 255)
    assert default_step("l2", 128 / 255, 10) == pytest.approx(2 * 128 / 255 / 10)  # 6.4x 2/255
    assert default_step("l2", 0.5, 40) == pytest.approx(0.025)  # validation/evaluation PGD-40 at L2
    model, x, y = trained
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        unset = pgd(model, x, y, norm=norm, eps=eps, step=None, steps=3, generator=torch.Generator().manual_seed(0))
        explicit = pgd(model, x, y, norm=norm, eps=eps, step=default_step(norm, eps, 3), steps=3,
                       generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(unset, explicit)
