"""Worker side of the generation job (`raylab.pipeline.generate_job` builds the Ray Data pipeline from these).

- `JobSpec`: everything an actor needs, resolved and checked in the driver by `generate_job.plan_job`.
- Stage UDFs: `SamplerActor` (generator → a shard's images), `ScorerActor` (label / score / pred / confidence),
  `write_shards` (rows → `ShardStore.write_shard`); `ShardScorerActor` scores the shards of an existing store
  (`generate_job.score_store`).

Ray Data pickles the actor classes and UDFs by module path, so they stay top-level names of this module.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raylab.cluster import RootToken, check_this_node
from raylab.config import GenerateConfig
from raylab.data.shards import ShardStore, read_numpy
from raylab.data.shard_layout import load_manifest, shard_name
from raylab.pipeline.generators import GENERATORS, GenerateError
from raylab.pipeline.plan import SeedPlan
from raylab.pipeline.quality import Scorer, score_columns
from raylab.runtime import pick_device

SCORE_BATCH = 256     # scorer chunk: fixed, so a shard's scores do not depend on any setting
SCORE_COLUMNS = ("label", "score", "pred", "confidence")
_DTYPES = {"label": np.int16, "score": np.float32, "pred": np.int16, "confidence": np.float32, "seed": np.int64}


# ---------------------------------------------------------------------------------------------------------------
# The job spec: everything an actor needs, checked in the driver before any compute.

@dataclass(frozen=True)
class JobSpec:
    generator: str
    checkpoint: str
    generate: GenerateConfig
    plan: SeedPlan
    scorer: Optional[dict[str, Any]]
    store: str
    use_gpu: bool
    identity: dict[str, Any]
    note: str = ""
    fault_after_shards: Optional[tuple[str, int]] = None  # fault drill (tests): (marker, k), see _fault_drill
    root: Optional[RootToken] = None  # tracking.root's token: every actor checks its node sees it as it starts


# ---------------------------------------------------------------------------------------------------------------
# Stage UDFs. A row = one whole shard: first, last, image (its images' bytes), and after scoring the score
# columns, each packed as the bytes of a numpy array.

def _unpack(table: pa.Table, column: str, dtype: Any) -> np.ndarray:
    return np.frombuffer(table.column(column)[0].as_buffer(), dtype=dtype)


def _packed_row(first: int, last: int, arrays: dict[str, np.ndarray], seconds: float) -> pa.Table:
    """One shard row; `sample_s` is the sampler's busy time for it (throughput accounting in the driver)."""
    cols = {"first": pa.array([first], pa.int64()), "last": pa.array([last], pa.int64()),
            "sample_s": pa.array([seconds], pa.float64())}
    cols |= {k: pa.array([np.ascontiguousarray(v).tobytes()], pa.large_binary()) for k, v in arrays.items()}
    return pa.table(cols)


def _append(row: pa.Table, arrays: dict[str, np.ndarray], seconds: float) -> pa.Table:
    """The row plus packed `arrays` and `score_s`, the scorer's busy time."""
    for k, v in arrays.items():
        row = row.append_column(k, pa.array([np.ascontiguousarray(v).tobytes()], pa.large_binary()))
    return row.append_column("score_s", pa.array([seconds], pa.float64()))


def _fault_drill(fault: Optional[tuple[str, int]], store: str, sampled: list[str]) -> None:
    """Fault injection for the tests' kill drill; `fault` = (marker file, k), off when None.

    An actor that has sampled k shards (`sampled`, their file names) claims `marker` as it starts its next one,
    waits until those k are recorded in the store (they are on their way through scorer and writer; at most 60 s),
    writes the store's shard count into `marker` and kills its own process: an actor lost mid-job, with a shard in
    flight and its earlier ones on disk. Ray restarts it; the new process finds the marker taken and samples on."""
    if not fault or len(sampled) < fault[1]:
        return
    try:
        fd = os.open(fault[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    deadline = time.monotonic() + 60.0
    while not set(sampled) <= set(shards := load_manifest(store)["shards"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.write(fd, str(len(shards)).encode())
    os.close(fd)
    os._exit(1)


class SamplerActor:
    """Holds the generator; each call samples the shards in its batch (batch_size=1: one shard)."""

    def __init__(self, spec: JobSpec):
        check_this_node(spec.root)
        self.spec, self.device = spec, pick_device(spec.use_gpu)
        self.generator = GENERATORS[spec.generator].load(Path(spec.checkpoint), spec.generate, self.device)
        self.sampled: list[str] = []  # shard names sampled by this process (for the fault drill)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        _fault_drill(self.spec.fault_after_shards, self.spec.store, self.sampled)
        self.sampled += [shard_name(int(a), int(b)) for a, b in zip(batch["first"], batch["last"])]
        return pa.concat_tables([self.sample_shard(int(a), int(b)) for a, b in zip(batch["first"], batch["last"])])

    def sample_shard(self, first: int, last: int) -> pa.Table:
        start, rows = time.perf_counter(), self.spec.plan.rows(first, last)
        kind = GENERATORS[self.spec.generator]
        images = kind.sample(self.generator, rows.rng_seeds, rows.class_cond, self.spec.generate, self.device)
        return _packed_row(first, last, {"image": images}, time.perf_counter() - start)


class ScorerActor:
    """Holds the scorer; adds label / score / pred / confidence to each shard row."""

    def __init__(self, spec: JobSpec):
        check_this_node(spec.root)
        self.spec = spec
        self.scorer = Scorer.load(spec.scorer, pick_device(spec.use_gpu))

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.concat_tables([self.score_shard(table.slice(i, 1)) for i in range(table.num_rows)])

    def score_shard(self, row: pa.Table) -> pa.Table:
        start = time.perf_counter()
        first, last = row.column("first")[0].as_py(), row.column("last")[0].as_py()
        images = _unpack(row, "image", np.uint8).reshape(-1, 32, 32, 3)
        class_cond = self.spec.plan.rows(first, last).class_cond
        cols = score_columns(self.scorer.probs(images, SCORE_BATCH), class_cond)
        return _append(row, cols, time.perf_counter() - start)


def shard_columns(row: pa.Table, plan: SeedPlan) -> tuple[int, int, dict[str, np.ndarray]]:
    """A packed shard row → (first, last, shard columns) in the shard schema."""
    first, last = row.column("first")[0].as_py(), row.column("last")[0].as_py()
    seed = np.arange(first, last + 1, dtype=np.int64)
    class_cond = plan.locate(seed)[0].astype(np.int16)
    cols = {"image": _unpack(row, "image", np.uint8).reshape(-1, 32, 32, 3), "seed": seed, "class_cond": class_cond,
            "label": class_cond}
    cols |= {k: _unpack(row, k, _DTYPES[k]) for k in SCORE_COLUMNS if k in row.column_names}
    if len(cols["image"]) != len(seed) or (class_cond.min() < 0 and "pred" not in cols):
        raise GenerateError(f"shard {first}-{last}: {len(cols['image'])} images for {len(seed)} seeds, or an "
                            "unconditional shard without scorer pseudo-labels")
    return first, last, cols


WRITTEN = pa.schema([("first", pa.int64()), ("rows", pa.int64()), ("bytes", pa.int64()),
                     ("sample_s", pa.float64()), ("score_s", pa.float64())])


def write_shards(table: pa.Table, store: str, plan: SeedPlan, root: Optional[RootToken] = None) -> pa.Table:
    """Writer UDF: each shard row through ShardStore.write_shard; returns a `WRITTEN` row per shard (with the
    sampler's and scorer's busy seconds for it). A task runs on any node: it checks the node sees `root` first."""
    check_this_node(root)
    out = []
    for i in range(table.num_rows):
        row = table.slice(i, 1)
        first, last, cols = shard_columns(row, plan)
        entry = ShardStore(store).write_shard(first, last, cols)
        busy = {k: row.column(k)[0].as_py() if k in row.column_names else 0.0 for k in ("sample_s", "score_s")}
        out.append({"first": first, "rows": entry["rows"], "bytes": entry["bytes"]} | busy)
    return pa.Table.from_pylist(out, schema=WRITTEN)


# ---------------------------------------------------------------------------------------------------------------
# A scoring pass over an existing store (the second scorer of select.policy=agreement).

class ShardScorerActor:
    """Reads one verified shard per call and scores its images against their stored labels."""

    def __init__(self, store: str, scorer: dict[str, Any], use_gpu: bool, root: Optional[RootToken] = None):
        check_this_node(root)
        self.store, self.scorer = store, Scorer.load(scorer, pick_device(use_gpu))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("seed", "score", "pred", "confidence")}
        for name, rows in zip(batch["name"], batch["rows"]):
            data = read_numpy(self.store, columns=["image", "label", "seed"], rows={str(name): np.arange(rows)})
            cols = score_columns(self.scorer.probs(data["image"], SCORE_BATCH), data["label"]) | {"seed": data["seed"]}
            for k in out:
                out[k].append(cols[k])
        return {k: np.concatenate(v) for k, v in out.items()}
