"""Ray Data actor pools of the generation room: samplers and scorers are separate pools, each with its own CPUs
and GPUs (GPU by configuration alone). Shared by the generation job and the scoring pass (raylab.pipeline.scoring).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from raylab.config import ResourcesConfig
from raylab.pipeline.generators import GenerateError


@dataclass(frozen=True)
class StageResources:
    actors: int
    cpus: float
    gpus: float  # a fraction shares a GPU between actors

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def ray_args(self) -> dict[str, Any]:
        """map_batches resource kwargs; no GPU is None, Ray's own default, rather than 0."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus or None}


STAGES: dict[str, Callable[[ResourcesConfig], StageResources]] = {
    "sampler": lambda r: StageResources(r.sampler_actors, r.cpus_per_actor, r.gpus_per_actor),
    "scorer": lambda r: StageResources(r.scorer_actors, r.scorer_cpus_per_actor, r.scorer_gpus_per_actor),
}


def stage_resources(res: ResourcesConfig, stage: str) -> StageResources:
    if stage not in STAGES:
        raise GenerateError(f"actor stage {stage!r}: use one of {', '.join(STAGES)}")
    return STAGES[stage](res)


def actor_resources(res: ResourcesConfig, stage: str) -> dict[str, Any]:
    """The `map_batches` resource kwargs (num_cpus, num_gpus) of one actor stage ("sampler" or "scorer")."""
    return stage_resources(res, stage).ray_args()


def actor_pool(ds: Any, cls: type, kwargs: dict[str, Any], stage: str, res: ResourcesConfig, batch_format: str) -> Any:
    """An actor-pool stage; one shard per call and one call in flight per actor (shards are long: balance
    beats hiding dispatch latency, ray ActorPoolStrategy docs)."""
    import ray.data

    stage_res = stage_resources(res, stage)
    return ds.map_batches(
        cls, fn_constructor_kwargs=kwargs, batch_size=1, batch_format=batch_format,
        compute=ray.data.ActorPoolStrategy(size=stage_res.actors, max_tasks_in_flight_per_actor=1),
        # A lost actor is restarted and its shard retried by Ray Data's defaults (unlimited): passing
        # max_restarts/max_task_retries as remote args is deprecated (removal in 2.64) and only lowered them.
        **stage_res.ray_args())
