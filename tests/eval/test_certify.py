"""Randomized-smoothing CERTIFY on models whose smoothed probabilities are known in closed form."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from raylab.eval.certify import ABSTAIN, certified_accuracy_curve, certify, pa_lower_bound
from raylab.eval.metrics import EvalError

SIGMA, SIDE = 0.25, 4          # images 1 x 4 x 4: d = 16 pixels
D = SIDE * SIDE


class MeanThreshold(nn.Module):
    """Class 1 iff the mean pixel exceeds `threshold` (a linear 2-class model).

    Under x + N(0, sigma^2 I) the mean pixel is N(m, sigma^2 / d), so the smoothed classifier's top-class
    probability is pA = Phi((m - t) sqrt(d) / sigma) and sigma * Phi^-1(pA) = (m - t) sqrt(d): the exact L2 distance
    to the decision boundary. A sound certificate is below it and, with many samples, close to it.
    """

    def __init__(self, threshold=0.5):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        s = x.flatten(1).mean(1) - self.threshold
        return torch.stack([-s, s], dim=1)


class ConstantClass(nn.Module):
    def __init__(self, k=3, num_classes=5):
        super().__init__()
        self.register_buffer("bias", torch.nn.functional.one_hot(torch.tensor(k), num_classes).float())

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True) * 0.0 + self.bias


def images(means):
    return torch.tensor(means, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, SIDE, SIDE).contiguous()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_radius_is_below_and_close_to_the_true_distance():
    # Margins chosen so that pA = 0.9 and 0.99.
    deltas = [SIGMA * norm.ppf(p) / math.sqrt(D) for p in (0.9, 0.99)]
    x = images([0.5 + d for d in deltas] + [0.5 - deltas[0]])
    preds, radii = certify(MeanThreshold().eval(), x, sigma=SIGMA, n0=100, n=10_000, alpha=0.001,
                           batch_size=2500, generator=gen(), num_classes=2)
    assert preds.tolist() == [1, 1, 0]
    truth = np.array([deltas[0], deltas[1], deltas[0]]) * math.sqrt(D)
    assert np.all(radii < truth)
    assert np.all(radii > truth - 0.05)  # n = 10,000 gives pA within ~0.01 of the truth at alpha = 0.001


def test_abstains_when_the_two_classes_are_equally_likely():
    preds, radii = certify(MeanThreshold().eval(), images([0.5, 0.5]), sigma=SIGMA, n0=100, n=2000,
                           batch_size=1000, generator=gen(1), num_classes=2)
    assert preds.tolist() == [ABSTAIN, ABSTAIN] and radii.tolist() == [0.0, 0.0]


def test_constant_model_certifies_the_all_hits_bound():
    n, alpha = 500, 0.001
    preds, radii = certify(ConstantClass(k=3).eval(), torch.rand(2, 3, 4, 4), sigma=0.5, n0=10, n=n, alpha=alpha,
                           batch_size=128, generator=gen(), num_classes=5)
    assert preds.tolist() == [3, 3]
    assert np.allclose(radii, 0.5 * norm.ppf(alpha ** (1 / n)), rtol=1e-9, atol=0)


def test_clopper_pearson_lower_bound():
    assert pa_lower_bound(0, 100, 0.001) == 0.0
    assert math.isclose(pa_lower_bound(100, 100, 0.001), 0.001 ** (1 / 100), rel_tol=1e-9)
    # One-sided bound: P(Binomial(n, p_lower) >= k) = alpha.
    k, n, alpha = 70, 100, 0.01
    p = pa_lower_bound(k, n, alpha)
    assert math.isclose(binom.sf(k - 1, n, p), alpha, rel_tol=1e-6)
    assert pa_lower_bound(70, 100, 0.001) < p < 0.7


def test_same_generator_state_reproduces_certificates():
    x = images([0.52, 0.55])
    runs = [certify(MeanThreshold().eval(), x, sigma=SIGMA, n0=50, n=500, batch_size=200, generator=gen(7),
                    num_classes=2) for _ in range(2)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


def test_certified_accuracy_curve():
    preds = np.array([1, 0, ABSTAIN, 2])
    radii = np.array([0.5, 0.2, 0.0, 1.0])
    labels = np.array([1, 0, 2, 1])
    assert certified_accuracy_curve(preds, radii, labels, [0.0, 0.2, 0.25, 0.5, 1.0]) == \
        [(0.0, 0.5), (0.2, 0.5), (0.25, 0.25), (0.5, 0.25), (1.0, 0.0)]
    with pytest.raises(EvalError, match="equal non-empty"):
        certified_accuracy_curve(preds, radii[:3], labels, [0.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma"), ({"n0": 0}, "n0"), ({"n": 0}, "n"), ({"alpha": 1.0}, "alpha"),
    ({"num_classes": 1}, "num_classes"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_fail_before_sampling(kwargs, match):
    args = {"sigma": 0.25, "n0": 10, "n": 10, "alpha": 0.001, "batch_size": 4, "num_classes": 2, **kwargs}
    with pytest.raises(EvalError, match=match):
        certify(MeanThreshold().eval(), images([0.5]), generator=gen(), **args)


def test_train_mode_and_wrong_class_count_are_errors():
    with pytest.raises(EvalError, match="train mode"):
        certify(MeanThreshold().train(), images([0.5]), sigma=0.25, batch_size=4, generator=gen(), num_classes=2)
    with pytest.raises(EvalError, match="outputs 2 logits"):
        certify(MeanThreshold().eval(), images([0.5]), sigma=0.25, n0=4, n=4, batch_size=4, generator=gen(),
                num_classes=3)
