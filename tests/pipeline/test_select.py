"""Selection policies and views over a store written directly (no generator needed)."""
import json

import numpy as np
import pytest

from raylab.config import SelectConfig
from raylab.data.shards import ShardStore
from raylab.pipeline.generated_input import open_generated
from raylab.pipeline.select import (SelectError, balanced_prefix, build_view, describe, load_scores, load_view,
                                    save_scores, scores_path, select_rows, top_fraction_per_class)

K, PER_CLASS, SHARD = 3, 20, 15


def make_store(root, scored=True, identity="set-a"):
    """K classes × PER_CLASS images in the generated layout (seed = class * PER_CLASS + j), random scores."""
    rng = np.random.default_rng(0)
    n = K * PER_CLASS
    seed = np.arange(n)
    label = (seed // PER_CLASS).astype(np.int16)
    cols = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "label": label, "seed": seed,
            "class_cond": label}
    if scored:
        pred = np.where(rng.random(n) < 0.7, label, (label + 1) % K).astype(np.int16)
        cols |= {"score": rng.random(n).astype(np.float32), "pred": pred,
                 "confidence": rng.uniform(0.3, 1.0, n).astype(np.float32)}
    store = ShardStore(root).create_or_open({"test": identity})
    for a in range(0, n, SHARD):
        b = min(a + SHARD, n) - 1
        store.write_shard(a, b, {k: v[a:b + 1] for k, v in cols.items()})
    return store, cols


def test_topk_keeps_the_top_fraction_of_every_class():
    label = np.repeat(np.arange(K), PER_CLASS).astype(np.int16)
    score = np.random.default_rng(1).random(len(label)).astype(np.float32)
    keep = top_fraction_per_class(label, score, np.arange(len(label)), 0.2)  # Wang et al. 2023: 100K of 500K per class
    assert np.bincount(label[keep]).tolist() == [4] * K
    for c in range(K):
        mine = label == c
        assert score[keep & mine].min() > score[~keep & mine].max()
    tie = top_fraction_per_class(np.zeros(4, np.int16), np.ones(4), np.array([9, 3, 7, 5]), 0.5)
    assert tie.tolist() == [False, True, False, True]  # ties go to the lower plan index


def test_agreement_drops_only_confident_disagreements_below_threshold():
    cols = {"seed": np.arange(4), "label": np.zeros(4, np.int16), "pred": np.array([0, 0, 1, 1]),
            "pred2": np.array([0, 1, 0, 2]), "confidence": np.array([0.5, 0.5, 0.95, 0.5]),
            "confidence2": np.array([0.5, 0.5, 0.5, 0.5])}
    chosen = select_rows(cols, SelectConfig(policy="agreement", agreement_confidence=0.9))
    # agree → kept; disagree + both unsure → dropped; disagree but one ≥ 0.9 → kept (Sehwag et al. 2022 §3.3.1)
    assert chosen.keep.tolist() == [True, False, True, False]


def test_balanced_prefix_takes_the_first_rows_of_each_class_in_plan_order():
    labels = np.array([0, 1, 0, 1, 2, 0, 2, 1, 2], np.int16)
    keep = balanced_prefix(labels, np.ones(9, bool), 7)  # 3 classes: 3, 2, 2
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert balanced_prefix(labels, np.ones(9, bool), 0).all()
    with pytest.raises(SelectError, match="class 0"):
        balanced_prefix(labels, np.ones(9, bool), 12)


def test_topk_view_references_rows_without_copying_images(tmp_path):
    store, cols = make_store(tmp_path / "store")
    view = build_view(store.root, SelectConfig(policy="topk", top_fraction=0.25), tmp_path / "view")
    assert len(view) == K * 5 and np.all(np.diff(view.seed) > 0)
    assert describe(view)["per_class"] == {0: 5, 1: 5, 2: 5}
    assert not list((tmp_path / "view").glob("*.parquet"))
    assert describe(view)["view_bytes"] < 0.2 * describe(view)["image_bytes_referenced"]
    loaded = load_view(tmp_path / "view")
    data = loaded.read_numpy(["image", "label", "seed", "score"])
    np.testing.assert_array_equal(data["seed"], view.seed)
    np.testing.assert_array_equal(data["image"], cols["image"][view.seed])  # the store's own bytes
    np.testing.assert_array_equal(data["score"], cols["score"][view.seed])
    assert set(loaded.rows) == {n for n in json.loads((tmp_path / "view" / "view.json").read_text())["shards"]}


def test_amount_prefix_is_nested_and_balanced(tmp_path):
    store, _ = make_store(tmp_path / "store")
    small = build_view(store.root, SelectConfig(policy="none", amount=6), tmp_path / "small")
    large = build_view(store.root, SelectConfig(policy="none", amount=12), tmp_path / "large")
    assert describe(small)["per_class"] == {0: 2, 1: 2, 2: 2}
    assert set(small.seed) <= set(large.seed)
    np.testing.assert_array_equal(large.balanced_prefix(6).seed, small.seed)


def test_pseudo_relabels_with_the_scorer_and_agreement_uses_a_second_scores_file(tmp_path):
    store, cols = make_store(tmp_path / "store")
    pseudo = build_view(store.root, SelectConfig(policy="pseudo", top_fraction=1.0), tmp_path / "pseudo")
    np.testing.assert_array_equal(pseudo.label, cols["pred"][pseudo.seed])
    assert not np.array_equal(pseudo.label, cols["label"][pseudo.seed])
    np.testing.assert_array_equal(pseudo.read_numpy(["label"])["label"], cols["pred"][pseudo.seed])

    second = {"seed": cols["seed"], "pred": (cols["pred"] + 1) % K, "confidence": np.full(len(cols["seed"]), 0.5),
              "score": np.full(len(cols["seed"]), 0.5)}
    path = save_scores(scores_path(store.root, "ab" * 32), second, {"identity_hash": store.identity_hash})
    assert load_scores(path, store.identity_hash)[1]["seed"].tolist() == cols["seed"].tolist()
    agreed = build_view(store.root, SelectConfig(policy="agreement", agreement_confidence=0.9), tmp_path / "agree",
                        second=path)
    expected = ~(cols["confidence"] < 0.9)  # every row disagrees; kept only where scorer 1 is confident
    np.testing.assert_array_equal(agreed.seed, cols["seed"][expected])


def test_views_refuse_missing_scores_a_torn_write_and_a_changed_store(tmp_path):
    store, _ = make_store(tmp_path / "unscored", scored=False)
    with pytest.raises(SelectError, match="needs columns"):
        build_view(store.root, SelectConfig(policy="topk"), tmp_path / "v0")
    with pytest.raises(SelectError, match="second scorer"):
        build_view(store.root, SelectConfig(policy="agreement"), tmp_path / "v0")
    build_view(store.root, SelectConfig(policy="none"), tmp_path / "v1")
    (tmp_path / "v1" / "rows.npz").write_bytes(b"torn")
    with pytest.raises(SelectError, match="torn"):
        load_view(tmp_path / "v1")
    store2, _ = make_store(tmp_path / "store2")
    build_view(store2.root, SelectConfig(policy="none"), tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / "view.json").read_text())
    (store2.root / "manifest.json").write_text((store2.root / "manifest.json").read_text()
                                               .replace(meta["identity_hash"], "0" * 64))
    with pytest.raises(SelectError, match="identity"):
        load_view(tmp_path / "v2")


def test_view_row_index_names_exactly_the_selected_rows(tmp_path):
    from raylab.data.mix import GeneratedStream

    store, cols = make_store(tmp_path / "store")
    view = build_view(store.root, SelectConfig(policy="pseudo", top_fraction=0.5, amount=9), tmp_path / "view")
    index = open_generated(tmp_path / "view")
    assert len(index) == len(view) == 9
    stream = GeneratedStream(index, 9, seed=0)  # one batch = one pass over the view, read from the shards
    images, labels = stream.next_batch()
    order = np.argsort(stream.last_seeds)
    assert stream.last_seeds[order].tolist() == view.seed.tolist()
    assert labels[order].tolist() == view.label.tolist()  # the view's (pseudo-)labels, not the stored ones
    np.testing.assert_array_equal(images[order], cols["image"][view.seed])
    whole = open_generated(store.root)
    assert len(whole) == K * PER_CLASS and len(whole.files) == len(store.shard_paths())


def test_data_describe_prints_the_score_quantiles_of_the_view(tmp_path, capsys):
    from raylab import cli
    from raylab.pipeline.select import QUANTILES

    _, cols = make_store(tmp_path / "store")
    build_view(tmp_path / "store", SelectConfig(policy="topk", top_fraction=0.5), tmp_path / "view")
    assert cli.main(["data", "describe", str(tmp_path / "view")]) == 0
    described = json.loads(capsys.readouterr().out)
    kept = np.concatenate([np.sort(cols["score"][cols["label"] == c])[-PER_CLASS // 2:] for c in range(K)])
    expected = {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(kept, QUANTILES))}
    assert described["score_quantiles"] == pytest.approx(expected, rel=1e-6)
    assert described["score_quantiles"]["0.0"] == pytest.approx(float(kept.min()))  # the per-class cut, not 0
    assert described["rows"] == K * PER_CLASS // 2 and described["per_class"] == {str(c): 10 for c in range(K)}


def test_second_scores_is_none_unless_agreement_and_agreement_needs_a_second_checkpoint(tmp_path):
    from raylab.presets import make_config
    from raylab.pipeline.select import check_second
    from raylab.pipeline.scoring import second_scores

    assert second_scores(make_config("tiny", {"select.policy": "topk"}), tmp_path / "no-store") is None
    cfg = make_config("tiny", {"select.policy": "agreement"})
    with pytest.raises(SelectError, match="select.second_checkpoint: required"):
        second_scores(cfg, tmp_path / "no-store")
    check_second(make_config("tiny", {"select.policy": "agreement", "select.second_checkpoint": "x"}).select)


def test_pseudo_labels_keep_the_same_top_k_in_every_pseudo_class():
    """Wang et al. 2023 App. A: the top 100K per pseudo-class of 5M unconditional samples. With a scorer that
    calls half of everything class 0, a per-class fraction would keep 2-3x more of class 0 than of the others."""
    from raylab.pipeline.select import select_rows

    rng = np.random.default_rng(0)
    n = 2000
    pred = np.where(rng.random(n) < 0.5, 0, rng.integers(1, K, n)).astype(np.int16)
    cols = {"seed": np.arange(n), "label": np.full(n, -1, np.int16), "pred": pred, "confidence": rng.random(n)}
    chosen = select_rows(cols, SelectConfig(policy="pseudo", top_fraction=0.2))
    counts = np.bincount(chosen.labels[chosen.keep], minlength=K)
    k = -(-2 * n // (10 * K))  # ceil(0.2 * N / K) per pseudo-class
    assert counts.tolist() == [k] * K
    for c in range(K):
        mine = pred == c
        threshold = np.sort(cols["confidence"][mine])[-k]
        assert (cols["confidence"][chosen.keep & mine] >= threshold).all()  # the most confident of each


def test_the_training_identity_of_a_view_or_store_is_its_content_read_from_its_files(tmp_path):
    """What names a training run (raylab.runs STAGE_INPUTS): two selections of one store differ, the same selection
    rebuilt elsewhere does not, and a whole store that gains a shard is another input."""
    from raylab.pipeline.generated_input import generated_input

    store, _ = make_store(tmp_path / "store")
    ids = {}
    for name, amount in (("a", 6), ("a2", 6), ("b", 12)):
        build_view(store.root, SelectConfig(policy="none", amount=amount), tmp_path / name)
        ids[name] = generated_input(tmp_path / name).identities()
    assert ids["a"] == ids["a2"] and ids["a"]["generated"] != ids["b"]["generated"]
    assert ids["a"]["scorer"] == "none"  # make_store records no scorer in its identity
    _, cols = make_store(tmp_path / "source")
    growing = ShardStore(tmp_path / "growing").create_or_open({"test": "set-a"})  # store's identity, resumed
    seen = []
    for first in range(0, K * PER_CLASS, SHARD):
        growing.write_shard(first, first + SHARD - 1, {k: v[first:first + SHARD] for k, v in cols.items()})
        seen.append(generated_input(growing.root).identities()["generated"])
    assert len(set(seen)) == len(seen)  # every shard more is another input
    assert seen[-1] == generated_input(store.root).identities()["generated"]  # complete: the same bytes, same identity
