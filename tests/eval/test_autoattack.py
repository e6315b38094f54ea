"""AutoAttack wrapper: known answers, equality with one library call, exact sharding, resume, guards."""
import json

import numpy as np
import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from raylab.eval.autoattack import AAResult, Budget, aggregate, run_autoattack
from raylab.eval.metrics import EvalError



def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)).eval()


def linear() -> nn.Module:
    """Cheapest model with 10 classes (APGD-T needs >= 10 for its 9 target classes)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 10)).eval()


class ConstantClass(nn.Module):
    """Logits independent of the input but differentiable w.r.t. it: predicts class 9 whatever happens."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, 10))

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True) * 0.0 + self.bias


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def data(n=8, seed=1):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def own_labels(model, x, wrong=2):
    """Labels = the model's predictions, the first `wrong` of them shifted (clean accuracy 1 - wrong/n)."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % 10
    return y


PARTIAL = dict(eps=4 / 255, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0, batch_size=4)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A linear model at a radius where AA breaks some but not all correctly classified points; run once, with a
    state file (the expensive part of this module: every robust point costs 5 x 100 + 9 x 100 APGD steps)."""
    model, x = linear(), data()
    y = own_labels(model, x)
    state = tmp_path_factory.mktemp("aa") / "state.json"
    rng = torch.random.get_rng_state()
    result = run_autoattack(model, x, y, state_path=state, **PARTIAL)
    assert torch.equal(torch.random.get_rng_state(), rng), "the library's manual_seed leaked"
    return model, x, y, result, state


def test_partial_result_is_consistent(partial):
    r = partial[3]
    assert r.n == 8 and r.clean_acc == 0.75
    assert 0 < r.robust_acc < r.clean_acc
    assert [name for name, _ in r.cascade] == ["apgd-ce", "apgd-t"]
    assert r.clean_acc >= r.cascade[0][1] >= r.cascade[1][1] == r.robust_acc
    assert r.robust.dtype == np.bool_ and r.robust.sum() == round(r.robust_acc * 8)
    assert not r.robust[:2].any()  # misclassified clean


def test_equals_one_library_call_with_all_attacks(partial):
    """The per-attack unrolling reproduces the library's own cascade bit for bit (so the seed fixes the result)."""
    model, x, y, r, _ = partial
    aa = AutoAttack(model, norm="Linf", eps=PARTIAL["eps"], version="custom", attacks=PARTIAL["attacks"],
                    seed=PARTIAL["seed"])
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=PARTIAL["batch_size"])
    assert (y_adv == y).numpy().tolist() == r.robust.tolist()


def test_non_robust_cnn_is_broken_at_large_eps():
    model, x = small_cnn(), data()
    y = own_labels(model, x, wrong=0)
    r = run_autoattack(model, x, y, eps=64 / 255, version="custom", attacks=["apgd-ce"], seed=0, batch_size=8)
    assert r.clean_acc == 1.0 and r.robust_acc == 0.0


def test_standard_cascade_lists_table6_attacks_in_order():
    """Rebuffi et al. 2021 Table 6 columns; the CNN falls to APGD-CE, so the later attacks have nothing left (fast)."""
    model, x = small_cnn(), data(4)
    y = own_labels(model, x, wrong=0)
    r = run_autoattack(model, x, y, norm="linf", eps=64 / 255, version="standard", seed=0, batch_size=4)
    assert r.cascade == [("apgd-ce", 0.0), ("apgd-t", 0.0), ("fab-t", 0.0), ("square", 0.0)]
    assert r.version == "standard" and r.norm == "linf"


def test_constant_class_model_keeps_exactly_its_clean_accuracy_and_warns():
    model, x = ConstantClass().eval(), data(4)
    y = torch.tensor([9, 0, 9, 0])
    for norm, eps, attack in (("linf", 64 / 255, "apgd-dlr"), ("l2", 2.0, "apgd-ce")):
        r = run_autoattack(model, x, y, norm=norm, eps=eps, version="custom", attacks=[attack], seed=0,
                           batch_size=4)
        assert r.clean_acc == r.robust_acc == 0.5
        assert r.robust.tolist() == [True, False, True, False]
        if attack == "apgd-dlr":  # the library checks gradients for the DLR losses only
            assert any("zero gradient" in w for w in r.warnings)  # pyautoattack's check, surfaced


def test_aggregate_is_exact_over_shards(partial):
    model, x, y = partial[:3]
    settings = {**PARTIAL, "attacks": ["apgd-ce"]}  # one attack keeps this cheap; the cascade sums are below
    shards = [run_autoattack(model, x[s], y[s], **settings) for s in (slice(0, 3), slice(3, 8))]
    whole = aggregate(shards)
    assert np.array_equal(whole.fell_at, np.concatenate([s.fell_at for s in shards])) and whole.n == 8
    assert whole.robust_acc == sum(s.robust.sum() for s in shards) / 8
    assert whole.clean_acc == sum(s.clean.sum() for s in shards) / 8
    assert whole.cascade[0][1] == sum(s.cascade[0][1] * s.n for s in shards) / 8


def test_aggregate_hand_made_and_mismatch():
    a = AAResult(np.array([-1, 0, 1], dtype=np.int16), ("apgd-ce", "apgd-t"), "custom", "linf", 0.03, 0)
    b = AAResult(np.array([2, -1], dtype=np.int16), ("apgd-ce", "apgd-t"), "custom", "linf", 0.03, 0, ("w",))
    ab = aggregate([a, b])
    assert ab.clean_acc == 4 / 5 and ab.robust_acc == 2 / 5
    assert ab.cascade == [("apgd-ce", 3 / 5), ("apgd-t", 2 / 5)]
    assert ab.warnings == ("w",)
    back = AAResult.from_json(json.loads(json.dumps(ab.to_json())))
    assert np.array_equal(back.fell_at, ab.fell_at) and back.cascade == ab.cascade and back.warnings == ("w",)
    with pytest.raises(EvalError, match="shards differ"):
        aggregate([a, AAResult(b.fell_at, b.attacks, "custom", "linf", 0.05, 0)])


def test_resume_from_state_after_interruption(partial, tmp_path):
    model, x, y, r, finished_state = partial
    # Rewind the state to "APGD-CE done, APGD-T not yet", as if the process died between the two attacks.
    state = json.loads(finished_state.read_text())
    state["done"] = ["apgd-ce"]
    state["result"]["fell_at"] = [-1 if f == 2 else f for f in state["result"]["fell_at"]]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    resumed = run_autoattack(model, x, y, state_path=path, **PARTIAL)
    assert np.array_equal(resumed.fell_at, r.fell_at)
    counting = Counting(model).eval()
    again = run_autoattack(counting, x, y, state_path=finished_state, **PARTIAL)
    assert np.array_equal(again.fell_at, r.fell_at) and counting.calls == 0  # nothing re-run


def test_state_of_another_evaluation_is_refused(partial):
    model, x, y, _, state = partial
    with pytest.raises(EvalError, match="another evaluation"):
        run_autoattack(model, x, y, state_path=state, **{**PARTIAL, "eps": 8 / 255})
    with pytest.raises(EvalError, match="another evaluation"):
        run_autoattack(model, x.flip(0), y.flip(0), state_path=state, **PARTIAL)


@pytest.mark.parametrize("kwargs, match", [
    ({"version": "rand"}, "version"),
    ({"version": "standard", "attacks": ["apgd-ce"]}, "only with version='custom'"),
    ({"version": "custom", "attacks": None}, "non-empty"),
    ({"version": "custom", "attacks": ["pgd"]}, "distinct names"),
    ({"version": "custom", "attacks": ["apgd-ce", "apgd-ce"]}, "distinct names"),
    ({"norm": "l1"}, "norm"),
    ({"seed": -1}, "seed"),
    ({"eps": -0.1}, "eps"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_fail_before_any_forward(kwargs, match):
    model = Counting(linear()).eval()
    args = {"norm": "linf", "eps": 8 / 255, "version": "custom", "attacks": ["apgd-ce"], "seed": 0,
            "batch_size": 4, **kwargs}
    with pytest.raises(EvalError, match=match):
        run_autoattack(model, data(2), torch.zeros(2, dtype=torch.int64), **args)
    assert model.calls == 0


def test_train_mode_is_an_error():
    model = linear().train()
    with pytest.raises(EvalError, match="train mode"):
        run_autoattack(model, data(2), torch.zeros(2, dtype=torch.int64), eps=8 / 255, version="custom",
                       attacks=["apgd-ce"], seed=0, batch_size=2)
    assert model.training


def test_a_custom_budget_equals_the_library_configured_the_same_way(partial):
    """Budget(iters, restarts, target classes) is the library's own APGD settings, nothing home-made."""
    model, x, y, _, _ = partial
    budget = Budget(iters=7, restarts=1, target_classes=2)
    r = run_autoattack(model, x, y, budget=budget, **PARTIAL)
    aa = AutoAttack(model, norm="Linf", eps=PARTIAL["eps"], version="custom", attacks=PARTIAL["attacks"],
                    seed=PARTIAL["seed"])
    aa.apgd.n_iter = aa.apgd_targeted.n_iter = 7
    aa.apgd.n_restarts, aa.apgd_targeted.n_target_classes = 1, 2
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=PARTIAL["batch_size"])
    assert (y_adv == y).numpy().tolist() == r.robust.tolist()
    assert budget.label() == "7 it, 1 restart, 2 targets" and Budget().label() == ""


def test_a_budget_is_refused_for_the_presets_and_a_state_of_another_budget_is_not_resumed(partial, tmp_path):
    model, x, y, _, state = partial
    with pytest.raises(EvalError, match="only with version='custom'"):
        run_autoattack(model, x, y, norm="linf", eps=1 / 255, version="standard", seed=0, batch_size=8,
                       budget=Budget(iters=10))
    with pytest.raises(EvalError, match="belongs to another evaluation"):
        run_autoattack(model, x, y, state_path=state, budget=Budget(iters=3), **PARTIAL)
