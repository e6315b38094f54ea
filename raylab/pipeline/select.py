"""Selecting generated images: policies over per-row scores, and *views* that name the kept rows without copying.

Policies (registry keyed like `select.policy`; each maps the store's non-image columns to kept rows + labels):
- "topk": per class, the `select.top_fraction` highest-`score` rows (Wang et al. 2023 App. A: the top 20% of 500K images
  per class by a standard WRN-28-10, i.e. 100K kept per class). Ties go to the lower plan index.
- "none": every row (Wang et al. 2023 uses all images once more than 1M are needed).
- "agreement": Sehwag et al.'s two-classifier filter (Sehwag et al. 2022 §3.3.1): drop an image when the two scorers'
  predictions differ AND both are less than `select.agreement_confidence` (0.9 there) confident. The second
  scorer's outputs come from a scoring pass over the store (`raylab.pipeline.scoring.score_store`) saved beside the shards
  as `scores/<scorer sha256[:16]>.npz` and joined on the `seed` column; `scoring.second_scores` runs it for both
  `raylab select` and sweeps (raylab.tune.artifacts).
- "pseudo": labels := the scorer's `pred`, then per pseudo-class the top `top_fraction` by `confidence`
  (Wang et al. 2023 App. A for unconditional EDM: pseudo-label = most confident class, top 100K of 5M per class).
Then `select.amount` keeps a balanced per-class prefix in plan order, so every amount of the Wang et al. 2023 Table 5
ablation is a nested subset of one generated set (plan order is random with respect to image content).

A view is a directory: `rows.npz` (seed, label, shard, row, score of each kept row, in store order) written first,
then `view.json` (store path, store identity hash, policy, counts, the sha256 of rows.npz) written last, both
atomically, so a view with a `view.json` is complete, and a view whose store was regenerated refuses to load. Its
row index for training, `index/`, is built beside them on first use (`raylab.pipeline.generated_input`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from raylab.config import SelectConfig
from raylab.data.shard_format import IMAGE_BYTES, ShardError, table_to_numpy
from raylab.data.shard_layout import load_manifest
from raylab.data.shards import read_numpy, read_table
from raylab.io import atomic_write, atomic_write_json, sha256_file

VIEW_FORMAT = "raylab-view/1"
VIEW_META, VIEW_ROWS = "view.json", "rows.npz"
SCORES_DIR, SCORES_FORMAT = "scores", "raylab-scores/1"
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


class SelectError(ValueError):
    """A one-line message naming the policy, view or column at fault and what is allowed."""


@dataclass(frozen=True)
class Selection:
    keep: np.ndarray    # bool [N]: rows kept
    labels: np.ndarray  # int16 [N]: the label each row trains with


# ---------------------------------------------------------------------------------------------------------------
# Policies.

Policy = Callable[[Mapping[str, np.ndarray], SelectConfig], Selection]
POLICIES: dict[str, Policy] = {}
POLICY_COLUMNS: dict[str, tuple[str, ...]] = {}


def register_policy(name: str, needs: tuple[str, ...] = ()):
    """Decorator: record `policy(columns, cfg) -> Selection` under `name`; `needs` are the columns it reads."""
    def wrap(fn: Policy) -> Policy:
        POLICIES[name], POLICY_COLUMNS[name] = fn, ("label", "seed") + needs
        return fn
    return wrap


def _top_per_class(labels: np.ndarray, score: np.ndarray, seed: np.ndarray,
                   count: Callable[[int], int]) -> np.ndarray:
    """Mask of the count(n_c) highest-scoring rows of every class c of n_c rows (ties: lower seed first)."""
    keep = np.zeros(len(labels), bool)
    order = np.lexsort((seed, -score.astype(np.float64), labels))  # by class, then score desc, then seed
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(order)]):
        keep[order[start:start + count(end - start)]] = True
    return keep


def top_fraction_per_class(labels: np.ndarray, score: np.ndarray, seed: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ceil(fraction · n_c) highest-scoring rows of every class c."""
    return _top_per_class(labels, score, seed, lambda n: math.ceil(fraction * n - 1e-9))


def top_k_per_class(labels: np.ndarray, score: np.ndarray, seed: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k highest-scoring rows of every class (all of a class with fewer)."""
    return _top_per_class(labels, score, seed, lambda n: min(k, n))


@register_policy("none")
def _none(cols: Mapping[str, np.ndarray], cfg: SelectConfig) -> Selection:
    return Selection(np.ones(len(cols["seed"]), bool), cols["label"])


@register_policy("topk", needs=("score",))
def _topk(cols: Mapping[str, np.ndarray], cfg: SelectConfig) -> Selection:
    return Selection(top_fraction_per_class(cols["label"], cols["score"], cols["seed"], cfg.top_fraction),
                     cols["label"])


@register_policy("pseudo", needs=("pred", "confidence"))
def _pseudo(cols: Mapping[str, np.ndarray], cfg: SelectConfig) -> Selection:
    """The same k most confident rows of every pseudo-class, k = top_fraction · N / K: Wang et al. 2023 App. A keeps
    the top 100K per class of 5M unconditional samples. A fraction of each pseudo-class would inherit the scorer's
    class imbalance."""
    labels = cols["pred"].astype(np.int16)
    k = math.ceil(cfg.top_fraction * len(labels) / max(len(np.unique(labels)), 1) - 1e-9)
    return Selection(top_k_per_class(labels, cols["confidence"], cols["seed"], k), labels)


@register_policy("agreement", needs=("pred", "confidence", "pred2", "confidence2"))
def _agreement(cols: Mapping[str, np.ndarray], cfg: SelectConfig) -> Selection:
    t = cfg.agreement_confidence
    drop = (cols["pred"] != cols["pred2"]) & (cols["confidence"] < t) & (cols["confidence2"] < t)
    return Selection(~drop, cols["label"])


def balanced_prefix(labels: np.ndarray, keep: np.ndarray, amount: int) -> np.ndarray:
    """`keep` cut to its first amount // K rows of each of its K classes, in row order; the first amount % K
    classes get one row more. A class with too few rows is an error (the ablation would be unbalanced)."""
    if amount <= 0:
        return keep
    classes = np.unique(labels[keep])
    if len(classes) == 0:
        raise SelectError(f"select.amount: {amount} requested but the policy kept no rows")
    quota = {int(c): amount // len(classes) + (i < amount % len(classes)) for i, c in enumerate(classes)}
    out = np.zeros_like(keep)
    for c, q in quota.items():
        rows = np.flatnonzero(keep & (labels == c))
        if len(rows) < q:
            raise SelectError(f"select.amount: {amount} needs {q} rows of class {c}, the selection has {len(rows)}")
        out[rows[:q]] = True
    return out


def select_rows(cols: Mapping[str, np.ndarray], cfg: SelectConfig) -> Selection:
    """Apply `cfg.policy` then the balanced `cfg.amount` prefix to the store's columns (sorted by seed)."""
    if cfg.policy not in POLICIES:
        raise SelectError(f"select.policy: {cfg.policy!r} is not one of {', '.join(POLICIES)}")
    missing = [c for c in POLICY_COLUMNS[cfg.policy] if c not in cols]
    if missing:
        hint = ("run a second scorer over the store (select.second_checkpoint)" if "pred2" in missing
                else "generate with a scorer (select.scorer_checkpoint)")
        raise SelectError(f"select.policy={cfg.policy}: needs columns {missing}, which the store lacks; {hint}")
    chosen = POLICIES[cfg.policy](cols, cfg)
    return Selection(balanced_prefix(chosen.labels, chosen.keep, cfg.amount), chosen.labels.astype(np.int16))


# ---------------------------------------------------------------------------------------------------------------
# Second-scorer outputs beside the store: scores/<sha16>.npz = seed, score, pred, confidence + meta.

def scores_path(store: str | os.PathLike, scorer_sha256: str) -> Path:
    return Path(store) / SCORES_DIR / f"{scorer_sha256[:16]}.npz"


def _write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """`arrays` and the JSON `meta` as an uncompressed .npz, written atomically straight to its temp file (a
    50M-row view's 1.1 GB is not built in memory first)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp file's name
            np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return atomic_write(path, write)


def save_scores(path: str | os.PathLike, cols: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    order = np.argsort(cols["seed"], kind="stable")
    arrays = {k: np.asarray(cols[k])[order] for k in ("seed", "score", "pred", "confidence")}
    return _write_npz(path, arrays, {"format": SCORES_FORMAT, **meta})


def load_scores(path: str | os.PathLike, identity_hash: Optional[str] = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, columns) of a scores file; with `identity_hash`, refuse one made for another store."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta, cols = json.loads(str(z["meta"])), {k: z[k] for k in z.files if k != "meta"}
    except (OSError, KeyError, ValueError) as err:
        raise SelectError(f"{path}: not a scores file ({err})") from None
    if meta.get("format") != SCORES_FORMAT:
        raise SelectError(f"{path}: format {meta.get('format')!r}, expected {SCORES_FORMAT!r}")
    if identity_hash and meta.get("identity_hash") != identity_hash:
        raise SelectError(f"{path}: scores of store {meta.get('identity_hash')}, not of this store {identity_hash}")
    return meta, cols


def check_second(cfg: SelectConfig) -> None:
    """select.policy=agreement needs select.second_checkpoint; checked before any generation or scoring."""
    if cfg.policy == "agreement" and not cfg.second_checkpoint:
        raise SelectError("select.second_checkpoint: required by select.policy=agreement (Sehwag et al. 2022 "
                          "two-classifier filter); set it to a classifier checkpoint or run directory")


SCORER_COLUMNS = ("score", "pred", "confidence")  # what a scoring pass adds to the shards


def check_policy(cfg: SelectConfig, scored: bool, why_unscored: str = "") -> None:
    """Before any generation: select.policy exists, and a policy that ranks by the scorer's outputs has a scorer
    (without one, CIFAR-10 would sample every image and only then fail in selection)."""
    if cfg.policy not in POLICIES:
        raise SelectError(f"select.policy: {cfg.policy!r} is not one of {', '.join(POLICIES)}")
    check_second(cfg)
    needs = [c for c in POLICY_COLUMNS[cfg.policy] if c in SCORER_COLUMNS]
    if needs and not scored:
        raise SelectError(f"select.policy={cfg.policy}: ranks by the scorer's {'/'.join(needs)}; set "
                          "select.scorer_checkpoint=PATH, or select.policy=none (" +
                          (why_unscored or "nothing scores the images") + ")")


def attach_second(cols: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the second scorer's `pred2`, `confidence2`, `score2`, joined on seed (both must cover the same rows)."""
    if not np.array_equal(cols["seed"], second["seed"]):
        raise SelectError(f"second scorer's scores cover {len(second['seed'])} rows that do not match the store's "
                          f"{len(cols['seed'])}; rerun the scoring pass")
    return dict(cols) | {f"{k}2": second[k] for k in ("pred", "confidence", "score")}


# ---------------------------------------------------------------------------------------------------------------
# Views.

@dataclass(frozen=True, eq=False)
class View:
    """Selected rows of a shard store, sorted by seed: `seed`, `label` (what training uses), `score`, and each
    row's position (`shard` index into meta["shards"], `row` within that shard)."""
    path: Optional[Path]
    meta: dict[str, Any]
    seed: np.ndarray
    label: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    score: np.ndarray

    @property
    def store(self) -> Path:
        return Path(self.meta["store"])

    @property
    def identity_hash(self) -> str:
        return self.meta["identity_hash"]

    def __len__(self) -> int:
        return len(self.seed)

    @property
    def rows(self) -> dict[str, np.ndarray]:
        """{shard file name: row positions}, what `shards.read_table(rows=...)` takes (one sort, not a pass over
        the rows per shard)."""
        order = np.argsort(self.shard, kind="stable")
        used, starts = np.unique(self.shard[order], return_index=True)
        names = self.meta["shards"]
        return {names[i]: part for i, part in zip(used, np.split(self.row[order], starts[1:]))}

    def read_numpy(self, columns: Optional[Sequence[str]] = None, verify: bool = True) -> dict[str, np.ndarray]:
        """The selected rows' columns (image decoded), `label` replaced by the view's labels."""
        out = table_to_numpy(read_table(self.store, columns=list(columns) if columns else None, verify=verify,
                                        rows=self.rows))
        if "label" in out:
            out["label"] = self.label.copy()
        return out

    def subset(self, keep: np.ndarray, **meta: Any) -> "View":
        """An in-memory view of the rows where `keep` is true (not written anywhere)."""
        fields = {f: getattr(self, f)[keep] for f in ("seed", "label", "shard", "row", "score")}
        return View(None, self.meta | {"rows": int(keep.sum())} | meta, **fields)

    def balanced_prefix(self, amount: int) -> "View":
        """The first amount // K rows of each class in plan order (the amount ablation, from one view)."""
        return self.subset(balanced_prefix(self.label, np.ones(len(self), bool), amount), amount=amount)


# ---------------------------------------------------------------------------------------------------------------
# Building, writing, loading and describing views.

def store_columns(store: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """(every non-image column, shard names in seed order, rows per shard) of a store; files verified."""
    manifest = load_manifest(store)
    entries = sorted(manifest["shards"].items(), key=lambda kv: kv[1]["first_seed"])
    if not entries:
        raise SelectError(f"{store}: the store has no shards yet (run `raylab generate` first)")
    columns = [c for c in entries[0][1]["columns"] if c != "image"]
    cols = read_numpy(store, columns=columns)
    return cols, [n for n, _ in entries], np.array([e["rows"] for _, e in entries], np.int64)


def build_view(store: str | os.PathLike, cfg: SelectConfig, out: str | os.PathLike,
               second: Optional[str | os.PathLike] = None) -> "View":
    """Select rows of `store` with `cfg` (plus a second scorer's scores file for "agreement") and write the view."""
    store = Path(store).resolve()
    cols, names, counts = store_columns(store)
    identity_hash = load_manifest(store)["identity_hash"]
    second_meta = None
    if second is not None:
        second_meta, second_cols = load_scores(second, identity_hash)
        cols = attach_second(cols, second_cols)
    chosen = select_rows(cols, cfg)
    idx = np.flatnonzero(chosen.keep)
    shard_of_row = np.repeat(np.arange(len(names), dtype=np.int32), counts)
    row_in_shard = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    score = cols["score"] if "score" in cols else np.full(len(shard_of_row), np.nan, np.float32)
    meta = {"format": VIEW_FORMAT, "store": str(store), "identity_hash": identity_hash, "policy": cfg.policy,
            "select": dataclasses.asdict(cfg), "second_scorer": second_meta, "store_rows": int(counts.sum()),
            "rows": int(len(idx)), "shards": names, "amount": cfg.amount}
    view = View(Path(out), meta, cols["seed"][idx], chosen.labels[idx], shard_of_row[idx],
                row_in_shard[idx].astype(np.int32), np.asarray(score[idx], np.float32))
    return write_view(view, out)


def write_view(view: View, out: str | os.PathLike) -> View:
    """rows.npz first, view.json (with rows.npz's sha256) last, each atomically."""
    out = Path(out)
    arrays = {f: getattr(view, f) for f in ("seed", "label", "shard", "row", "score")}
    _write_npz(out / VIEW_ROWS, arrays, {"format": VIEW_FORMAT})
    meta = view.meta | {"rows": len(view), "rows_sha256": sha256_file(out / VIEW_ROWS)}
    atomic_write_json(out / VIEW_META, meta)
    return dataclasses.replace(view, path=out, meta=meta)


def view_meta(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(folder, view.json) of the view at `path` (its directory or view.json)."""
    path = Path(path)
    folder = path.parent if path.name == VIEW_META else path
    try:
        meta = json.loads((folder / VIEW_META).read_text())
    except FileNotFoundError:
        raise SelectError(f"{folder}: no {VIEW_META} (not a view, or its writing was interrupted)") from None
    if meta.get("format") != VIEW_FORMAT:
        raise SelectError(f"{folder / VIEW_META}: format {meta.get('format')!r}, expected {VIEW_FORMAT!r}")
    return folder, meta


def load_view(path: str | os.PathLike, check_store: bool = True) -> View:
    """The view at `path` (its directory or view.json); refuses a torn view or one whose store changed."""
    folder, meta = view_meta(path)
    rows_file = folder / VIEW_ROWS
    if not rows_file.is_file() or sha256_file(rows_file) != meta.get("rows_sha256"):
        raise SelectError(f"{rows_file}: missing or does not match {VIEW_META} (torn write); rerun `raylab select`")
    if check_store:
        check_view_store(meta)
    with np.load(rows_file, allow_pickle=False) as z:
        arrays = {f: z[f] for f in ("seed", "label", "shard", "row", "score")}
    return View(folder, meta, **arrays)


def check_view_store(meta: Mapping[str, Any]) -> None:
    """The view's store still has the identity the view was made from."""
    try:
        found = load_manifest(meta["store"])["identity_hash"]
    except ShardError as err:
        raise SelectError(f"view's store: {err}") from None
    if found != meta["identity_hash"]:
        raise SelectError(f"{meta['store']}: store identity is now {found}, the view was made from "
                          f"{meta['identity_hash']}; rerun `raylab select`")


def describe(view: View) -> dict[str, Any]:
    """Rows, rows per class and score quantiles of a view (read from the view alone: no image is touched)."""
    classes, counts = np.unique(view.label, return_counts=True)
    finite = view.score[np.isfinite(view.score)]
    quantiles = ({str(q): float(v) for q, v in zip(QUANTILES, np.quantile(finite, QUANTILES))}
                 if finite.size else None)
    return {"view": str(view.path) if view.path else None, "store": str(view.store),
            "identity_hash": view.identity_hash, "policy": view.meta["policy"], "rows": len(view),
            "store_rows": view.meta["store_rows"], "per_class": {int(c): int(n) for c, n in zip(classes, counts)},
            "score_quantiles": quantiles, "view_bytes": _folder_bytes(view.path),
            "image_bytes_referenced": len(view) * IMAGE_BYTES}


def _folder_bytes(path: Optional[Path]) -> Optional[int]:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path else None


def selection_samples(view_path: str | os.PathLike, per_class: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(selected, rejected) uint8 images of shape (classes, per_class, 32, 32, 3): per class, the view's
    highest-scored rows and the highest-scored rows of the store it left out (what the filter refused); rows
    without a sample are white. Reads only those rows' images."""
    view = load_view(view_path)
    cols, names, counts = store_columns(view.store)
    shard = np.repeat(np.arange(len(names)), counts)
    row = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    kept = np.isin(cols["seed"], view.seed)
    score = cols["score"] if "score" in cols else np.zeros(len(kept), np.float32)
    classes = np.unique(cols["label"])
    panels = []
    for mask in (kept, ~kept):
        picks = [np.flatnonzero(mask & (cols["label"] == c)) for c in classes]
        picks = [p[np.argsort(-score[p], kind="stable")[:per_class]] for p in picks]
        chosen = np.concatenate(picks) if picks else np.array([], np.int64)
        images = _images_at(view.store, names, shard[chosen], row[chosen])
        panel = np.full((len(classes), per_class, 32, 32, 3), 255, np.uint8)
        at = 0
        for ci, p in enumerate(picks):
            panel[ci, :len(p)] = images[at:at + len(p)]
            at += len(p)
        panels.append(panel)
    return panels[0], panels[1]


def _images_at(store: Path, names: Sequence[str], shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Images at (shard, row) positions, in the order given."""
    out = np.zeros((len(shard), 32, 32, 3), np.uint8)
    for s in np.unique(shard):
        where = np.flatnonzero(shard == s)
        table = read_numpy(store, columns=["image"], rows={names[s]: row[where]})
        out[where] = table["image"]  # read_table takes rows in the order asked
    return out
