"""Clean and PGD accuracy: known answers on tiny models (non-robust CNN, constant-class model), guards."""
import pytest
import torch
from torch import nn

from raylab.eval.metrics import (EvalError, clean_accuracy, correct_flags, pgd_accuracy, pgd_flags, random_starts,
                                 require_eval_mode)



def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)).eval()


class ConstantClass(nn.Module):
    """Logits independent of the input but differentiable w.r.t. it (x * 0 + bias): nothing can attack it."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, 10))  # always predicts class 9

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True) * 0.0 + self.bias


class Exploding(nn.Module):
    """Fails the test if any forward pass happens (errors must come before compute)."""

    def forward(self, x):
        raise AssertionError("forward pass ran before the argument check")


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_clean_accuracy_counts_correct_predictions_any_batch_size():
    model, x = small_cnn(), data()
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    assert clean_accuracy(model, x, y, batch_size=16) == 0.75
    assert clean_accuracy(model, x, y, batch_size=3) == 0.75
    assert correct_flags(model, x, y, batch_size=5).tolist() == [False] * 4 + [True] * 12


def test_pgd_breaks_non_robust_cnn_at_large_eps():
    model, x = small_cnn(), data()
    y = model(x).argmax(1)
    accs = [pgd_accuracy(model, x, y, norm="linf", eps=e / 255, batch_size=8, generator=gen())
            for e in (1, 8, 64)]
    assert accs[0] > 0.5 and accs[-1] == 0.0
    assert accs == sorted(accs, reverse=True)
    assert pgd_accuracy(model, x, y, norm="l2", eps=4.0, steps=10, batch_size=16, generator=gen()) == 0.0


def test_constant_class_model_robust_accuracy_equals_clean_exactly():
    model, x = ConstantClass().eval(), data(8)
    y = torch.tensor([9, 0] * 4)
    clean = clean_accuracy(model, x, y, batch_size=8)
    assert clean == 0.5
    for norm, eps in (("linf", 64 / 255), ("l2", 2.0)):
        assert pgd_accuracy(model, x, y, norm=norm, eps=eps, steps=5, batch_size=3, generator=gen()) == clean


def test_misclassified_clean_points_are_never_robust():
    model, x = small_cnn(), data()
    y = model(x).argmax(1)
    y[::2] = (y[::2] + 1) % 10
    robust = pgd_flags(model, x, y, norm="linf", eps=0.0, steps=1, batch_size=16, generator=gen())
    assert robust.tolist() == correct_flags(model, x, y, batch_size=16).tolist()


def test_pgd_is_reproducible_and_leaves_global_rng_alone():
    model, x = small_cnn(), data()
    y = model(x).argmax(1)
    state = torch.random.get_rng_state()
    runs = [pgd_flags(model, x, y, norm="linf", eps=2 / 255, steps=5, batch_size=8, generator=gen(3))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_starts_drawn_for_the_whole_set_make_the_flags_independent_of_slicing():
    """Validation split over ranks (raylab.train.worker.validate): slices attacked with their slices of one draw
    of starts give the one-device flags, whatever the slices and batches. Ranks each drawing from the seeded
    generator give their images the starts of the first images instead, and other flags here."""
    model, x = small_cnn(), data(24)
    y = model(x).argmax(1)
    attack = dict(norm="linf", eps=3 / 255, steps=3)
    start = random_starts(x, norm="linf", eps=3 / 255, generator=gen(5))
    whole = pgd_flags(model, x, y, batch_size=24, start=start, **attack)
    assert 0 < whole.sum() < len(whole)  # some robust, some not: a slicing error would show
    assert torch.equal(whole, pgd_flags(model, x, y, batch_size=24, generator=gen(5), **attack))  # one batch
    for cuts, batch in (((0, 12, 24), 24), ((0, 5, 13, 24), 3)):
        parts = [pgd_flags(model, x[a:b], y[a:b], batch_size=batch, start=start[a:b], **attack)
                 for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(parts), whole)
    drawn_per_rank = [pgd_flags(model, x[a:b], y[a:b], batch_size=24, generator=gen(5), **attack)
                      for a, b in ((0, 12), (12, 24))]
    assert not torch.equal(torch.cat(drawn_per_rank), whole)


def test_a_start_of_the_wrong_shape_or_no_source_of_noise_fails_before_any_forward():
    x, y = data(4), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(EvalError, match="start: expected one random start per image"):
        pgd_flags(Exploding().eval(), x, y, norm="linf", eps=0.1, batch_size=4, start=torch.zeros(3, 3, 8, 8))
    with pytest.raises(EvalError, match="generator"):
        pgd_flags(Exploding().eval(), x, y, norm="linf", eps=0.1, batch_size=4)


def test_train_mode_is_an_error_and_is_not_switched():
    model, x = small_cnn().train(), data(4)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(EvalError, match="train mode"):
        clean_accuracy(model, x, y, batch_size=4)
    with pytest.raises(EvalError, match="train mode"):
        pgd_accuracy(model, x, y, norm="linf", eps=8 / 255, batch_size=4, generator=gen())
    assert model.training
    model.eval()
    model[0].train()  # one submodule in train mode is enough to change results
    with pytest.raises(EvalError, match="'0' is in train mode"):
        require_eval_mode(model)


@pytest.mark.parametrize("x, y, batch_size, match", [
    (torch.rand(4, 3, 8, 8) * 2, torch.zeros(4, dtype=torch.int64), 4, "in \\[0, 1\\]"),
    (torch.rand(4, 192), torch.zeros(4, dtype=torch.int64), 4, "shape \\(N, C, H, W\\)"),
    (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.int32), 4, "int64"),
    (torch.rand(4, 3, 8, 8), torch.zeros(3, dtype=torch.int64), 4, "shape \\(4,\\)"),
    (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64), 0, "batch_size"),
])
def test_bad_input_fails_before_any_forward(x, y, batch_size, match):
    with pytest.raises(EvalError, match=match):
        clean_accuracy(Exploding().eval(), x, y, batch_size=batch_size)
    with pytest.raises(EvalError, match=match):
        pgd_accuracy(Exploding().eval(), x, y, norm="linf", eps=0.1, batch_size=batch_size, generator=gen())


def test_bad_attack_settings_fail_before_any_forward():
    x, y = data(4), torch.zeros(4, dtype=torch.int64)
    for kwargs, match in (({"eps": -1.0}, "eps"), ({"steps": 0}, "steps"), ({"eps": float("nan")}, "eps"),
                          ({"norm": "l1"}, "norm"), ({"objective": "dlr"}, "objective")):
        args = {"norm": "linf", "eps": 0.1, **kwargs}
        with pytest.raises(EvalError, match=match):
            pgd_accuracy(Exploding().eval(), x, y, batch_size=4, generator=gen(), **args)


def test_wilson_interval_and_its_table_cell():
    """Against values computed by hand from Wilson's formula: 84/100 -> [75.6, 89.9]; 0/300 and 300/300 stay
    inside [0, 1]; more images, a narrower interval."""
    import math

    from raylab.eval.metrics import format_accuracy, wilson_interval

    low, high = wilson_interval(0.84, 100)
    assert (round(100 * low, 1), round(100 * high, 1)) == (75.6, 89.9)
    assert wilson_interval(0.0, 300)[0] == 0.0 and 0 < wilson_interval(0.0, 300)[1] < 0.02
    assert wilson_interval(1.0, 300)[1] == pytest.approx(1.0) and wilson_interval(1.0, 300)[0] > 0.98
    assert wilson_interval(0.5, 300)[1] - wilson_interval(0.5, 300)[0] < wilson_interval(0.5, 100)[1] - \
        wilson_interval(0.5, 100)[0]
    assert format_accuracy(0.84, 100) == "84.00 [75.6, 89.9]"
    assert format_accuracy(math.nan, 100) == "-" and all(math.isnan(v) for v in wilson_interval(0.5, 0))
