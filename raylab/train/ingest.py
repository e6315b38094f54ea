"""The training ingest of generated rows on Ray Data: each pass of a rank's `GeneratedStream` is one Ray Data
execution whose read tasks are the pass's windows (`raylab.data.mix`), read in order within an object-store budget.

A read task carries the row index's path (or, for an index with no file behind it, its window's blocks) and its
window's block numbers: it maps the index and reads this rank's share of the window itself, the row groups holding
it and no others. Tasks run wherever Ray schedules them; `preserve_order` hands their tables back in pass order,
which an exact resume needs.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from raylab.config import ExperimentConfig
from raylab.data.mix import READ_ROWS, PassPlan, read_window
from raylab.data.row_index import RowIndex
from raylab.data.shard_format import IMAGE_BYTES


def ingest_options(object_store_mb: int):
    """Ray Data options of the training ingest: a deterministic order (an exact resume replays the same stream),
    within an object-store budget so a worker's memory stays flat in the number of generated rows."""
    from ray.data import ExecutionOptions, ExecutionResources

    options = ExecutionOptions(preserve_order=True)
    if object_store_mb:
        options.resource_limits = ExecutionResources(object_store_memory=object_store_mb * 2**20)
    return options


def _read_task_fn(units: Sequence[PassPlan]):
    return [read_window(one, one.windows[0]) for one in units]


def read_units(plans: Sequence[PassPlan]) -> list[list[PassPlan]]:
    """The read tasks of consecutive passes, in order: each a run of one-window plans (`PassPlan.for_window`), a
    window alone once it holds READ_ROWS of the rank's rows (a small view's windows, one per pass, share a task)."""
    tasks: list[list[PassPlan]] = [[]]
    held = 0
    for plan in plans:
        for window in plan.windows:
            if tasks[-1] and held + window.rows // plan.world > READ_ROWS:
                tasks.append([])
                held = 0
            tasks[-1].append(plan.for_window(window))
            held += window.rows // plan.world
    return [t for t in tasks if t]


def window_datasource(units: Sequence[Sequence[PassPlan]]):
    """A Ray Data `Datasource` with one read task per unit of `read_units`, in order."""
    from ray.data.datasource import Datasource, ReadTask

    class PassWindows(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(p.windows[0].rows // p.world for task in units for p in task) * (IMAGE_BYTES + 2)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [ReadTask(functools.partial(_read_task_fn, task), _metadata(task)) for task in units]

    return PassWindows()


def _metadata(task: Sequence[PassPlan]):
    from ray.data.block import BlockMetadata

    files = sorted({p.index.files[f] for p in task for f in p.index.blocks["file"][list(p.windows[0].blocks)]})
    rows = sum(p.windows[0].rows // p.world for p in task)
    return BlockMetadata(num_rows=None, size_bytes=rows * (IMAGE_BYTES + 2), input_files=files, exec_stats=None)


def ray_pass_reader(object_store_mb: int = 0):
    """A `PassReader` for `GeneratedStream` that reads consecutive passes through Ray Data as one execution
    (budget: MiB for this rank)."""
    def read(plans: Sequence[PassPlan]) -> Iterator[pa.Table]:
        import ray.data

        # Read tasks ask for no CPU of their own: they run inside the rank's budget, which waits on them. Asking
        # for one, they never ran once Train workers held every CPU (the dress rehearsal: after a node loss, 4
        # workers on a 4-CPU node waited on their first window forever). The object-store budget bounds them.
        units = read_units(plans)
        ds = ray.data.read_datasource(window_datasource(units), override_num_blocks=max(len(units), 1), num_cpus=0)
        ds.context.execution_options = ingest_options(object_store_mb)
        ds.context.enable_progress_bars = False  # one pass per epoch or so: the epoch line is the progress
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    return read


def generated_stream(cfg: ExperimentConfig, index: RowIndex, rank: int, world: int):
    """Rank `rank`'s stream of generated rows, or None when batches hold none (train.ratio = 1). Its order is one
    per pass for all ranks together, seeded by train.seed alone (`raylab.data.mix`); it reads through Ray Data
    within this rank's share of resources.ingest_object_store_mb."""
    from raylab.data.mix import GeneratedStream, split_batch

    _, n_gen = split_batch(cfg.train.batch_size // world, cfg.train.ratio)
    if not n_gen:
        return None
    return GeneratedStream(index, n_gen, seed=cfg.train.seed, rank=rank, world=world,
                           reader=ray_pass_reader(cfg.resources.ingest_object_store_mb // world))


def generated_label_batches(index: RowIndex, cfg: ExperimentConfig, batches: int) -> list[np.ndarray]:
    """The labels of the generated part of the first `batches` global batches, read by every rank's stream exactly
    as training reads them (`raylab data mix-stats`)."""
    world = max(cfg.resources.num_workers, 1)
    ranks = [generated_stream(cfg, index, r, world) for r in range(world)]
    if ranks[0] is None:
        raise ValueError(f"train.ratio={cfg.train.ratio}: batches hold no generated rows")
    return [np.concatenate([stream.next_batch()[1] for stream in ranks]) for _ in range(batches)]
