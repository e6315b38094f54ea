"""Gradient-masking checks: a plain model passes, a model hiding its gradients behind rounding fails."""
import pytest
import torch
from torch import nn

from raylab.eval.checks import CHECK_ATTACKS, CheckReport, accuracy_vs_eps, accuracy_vs_steps
from raylab.eval.metrics import EvalError



def plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)).eval()


class Rounded(nn.Module):
    """Quantizes its input with torch.round before the network: the input gradient is exactly zero, and on binary
    images no perturbation below 0.5 changes the prediction: gradient attacks fail without any robustness."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x))


@pytest.fixture(scope="module")
def binary_data():
    """Binary images (pixels 0 or 1, digits-like), labelled by the plain model (clean accuracy 100 %)."""
    x = (torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad():
        y = plain()(x).argmax(1)
    return x, y


EPS = tuple(k / 255 for k in (0, 4, 16, 64))


@pytest.mark.parametrize("attack, steps", [("pgd", 20), ("apgd-ce", 20)])
def test_plain_model_passes_accuracy_vs_eps(binary_data, attack, steps):
    report = accuracy_vs_eps(plain(), *binary_data, eps_list=EPS, attack=attack, steps=steps, batch_size=16)
    assert report.passed, report.message
    assert report.accs[0] == 1.0 and report.accs[-1] <= 0.05
    assert report.xs == EPS and report.name == "accuracy_vs_eps"


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce"])
def test_rounding_model_fails_accuracy_vs_eps(binary_data, attack):
    report = accuracy_vs_eps(Rounded(plain()).eval(), *binary_data, eps_list=EPS, attack=attack, steps=10,
                             batch_size=16)
    assert not report.passed
    assert report.accs == (1.0,) * len(EPS)
    assert "gradient masking" in report.message and "above 5.0%" in report.message


def test_plain_model_passes_accuracy_vs_steps(binary_data):
    report = accuracy_vs_steps(plain(), *binary_data, steps_list=(5, 10, 20), eps=4 / 255, attack="apgd-ce",
                               batch_size=16)
    assert report.passed, report.message
    assert report.xs == (5.0, 10.0, 20.0) and len(report.accs) == 3


def test_accuracy_rising_with_steps_is_flagged(binary_data, monkeypatch):
    """An attack that gets *weaker* with more steps (a non-converging one) must fail the check."""
    def weakening(model, x, y, *, norm, eps, steps, seed, batch_size):
        return torch.arange(len(x)) < len(x) * steps / 20

    monkeypatch.setitem(CHECK_ATTACKS, "weakening", weakening)
    report = accuracy_vs_steps(plain(), *binary_data, steps_list=(5, 10, 20), attack="weakening", batch_size=16)
    assert report.accs == (0.25, 0.5, 1.0)
    assert not report.passed and "more steps raise accuracy at 10" in report.message
    lenient = accuracy_vs_steps(plain(), *binary_data, steps_list=(5, 10, 20), attack="weakening",
                                batch_size=16, tolerance=0.8)
    assert lenient.passed


def test_accuracy_rising_with_eps_is_flagged(binary_data, monkeypatch):
    def bumpy(model, x, y, *, norm, eps, steps, seed, batch_size):
        return torch.arange(len(x)) < (8 if eps == 4 / 255 else 0)

    monkeypatch.setitem(CHECK_ATTACKS, "bumpy", bumpy)
    report = accuracy_vs_eps(plain(), *binary_data, eps_list=(0.0, 2 / 255, 4 / 255, 8 / 255), attack="bumpy",
                             batch_size=16)
    assert not report.passed and "rises with eps" in report.message
    assert isinstance(report, CheckReport) and report.to_json()["passed"] is False


@pytest.mark.parametrize("kwargs, match", [
    ({"eps_list": (0.1, 0.05)}, "strictly increasing"),
    ({"eps_list": ()}, "non-empty"),
    ({"eps_list": (-0.1, 0.1)}, ">= 0"),
    ({"attack": "fgsm"}, "not one of"),
])
def test_bad_arguments_are_errors(binary_data, kwargs, match):
    with pytest.raises(EvalError, match=match):
        accuracy_vs_eps(plain(), *binary_data, batch_size=16, **kwargs)


def test_steps_must_be_positive_integers(binary_data):
    with pytest.raises(EvalError, match="integers >= 1"):
        accuracy_vs_steps(plain(), *binary_data, steps_list=(0.5, 2.0), batch_size=16)
