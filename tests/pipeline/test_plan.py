"""The seed plan: index layout, shard ranges, per-image seeds, identity."""
import numpy as np
import pytest

from raylab.config import GenerateConfig
from raylab.generate.seeds import image_seed
from raylab.pipeline.plan import PlanError, SeedPlan, sampler_identity, set_identity


def _plan(**kw) -> SeedPlan:
    return SeedPlan.from_config(GenerateConfig(per_class=7, shard_size=5, seed=3, **kw), num_classes=3)


def test_conditional_layout_and_shards_cover_every_index_once():
    plan = _plan()
    assert plan.size == 21 and plan.conditional
    shards = plan.shards()
    assert shards[0] == (0, 4) and shards[-1] == (20, 20)  # the last shard is shorter
    covered = np.concatenate([np.arange(a, b + 1) for a, b in shards])
    np.testing.assert_array_equal(covered, np.arange(21))
    cls, j = plan.locate(np.array([0, 1, 2, 3, 7, 20]))  # classes interleaved: i = j * K + class
    np.testing.assert_array_equal(cls, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(j, [0, 0, 0, 1, 2, 6])
    for first, last in shards[:-1]:  # every full shard holds every class
        assert set(plan.locate(np.arange(first, last + 1))[0].tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(plan.first_of_class(1, 3), [1, 4, 7])
    first, last = plan.shard_of(np.array([0, 4, 5, 20]))
    np.testing.assert_array_equal(first, [0, 0, 5, 20])
    np.testing.assert_array_equal(last, [4, 4, 9, 20])


def test_rows_carry_the_per_image_seed_of_class_and_index():
    plan = _plan()
    rows = plan.rows(5, 9)
    np.testing.assert_array_equal(rows.index, [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(rows.class_cond, [2, 0, 1, 2, 0])
    assert rows.rng_seeds == [image_seed(3, 2, 1), image_seed(3, 0, 2), image_seed(3, 1, 2), image_seed(3, 2, 2),
                              image_seed(3, 0, 3)]
    shared = _plan(seed_mode="shared").rows(0, 20).rng_seeds
    assert shared[0] == shared[1] == shared[2]  # the reference reuses seeds across classes
    assert len(set(plan.rows(0, 20).rng_seeds)) == 21


def test_unconditional_plan_has_the_same_budget_and_class_minus_one():
    plan = SeedPlan.from_config(GenerateConfig(per_class=7, shard_size=5), num_classes=3, conditional=False)
    assert plan.size == 21 and not plan.conditional
    rows = plan.rows(0, 3)
    assert set(rows.class_cond.tolist()) == {-1}
    assert rows.rng_seeds[1] == image_seed(0, -1, 1)


def test_identity_excludes_batch_size_but_includes_sampler_and_plan():
    a, b = GenerateConfig(batch_size=8), GenerateConfig(batch_size=64)
    assert sampler_identity(a) == sampler_identity(b)
    assert sampler_identity(a)["s_max"] == "inf"  # strict JSON
    assert sampler_identity(GenerateConfig(steps=18)) != sampler_identity(a)
    ident = set_identity({"kind": "edm", "sha256": "x"}, sampler_identity(a), _plan(), None)
    assert ident["plan"]["per_class"] == 7 and ident["plan"]["shard_size"] == 5 and ident["plan"]["dataset_seed"] == 3
    assert ident["plan"]["layout"] == "class-interleaved" and ident["format"] == "raylab-generated/2"


def test_bad_plans_fail_with_one_line_errors():
    with pytest.raises(PlanError, match="classes"):
        SeedPlan((1, 2), 5, 0, "disjoint", 5)
    with pytest.raises(PlanError, match="outside"):
        _plan().rows(18, 21)
    with pytest.raises(PlanError, match="exceeds"):
        SeedPlan((0,), 10**10 + 1, 0, "disjoint", 10)
