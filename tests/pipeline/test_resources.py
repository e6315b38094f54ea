"""Actor resources of the generation job (pure): samplers and scorers are separate pools, each with its own CPUs
and GPUs, so a GPU run is a configuration change alone."""
import pytest

from raylab.presets import make_config
from raylab.pipeline.generators import GenerateError
from raylab.pipeline.pools import actor_resources, stage_resources


def test_defaults_ask_for_one_cpu_and_no_gpu_in_both_pools():
    res = make_config("tiny").resources
    for stage in ("sampler", "scorer"):
        assert actor_resources(res, stage) == {"num_cpus": 1.0, "num_gpus": None}
        assert not stage_resources(res, stage).use_gpu


def test_gpu_settings_reach_num_gpus_of_their_own_stage_only():
    res = make_config("tiny", {"resources.gpus_per_actor": 1.0, "resources.cpus_per_actor": 4.0,
                               "resources.scorer_gpus_per_actor": 0.25, "resources.scorer_cpus_per_actor": 2.0,
                               "resources.sampler_actors": 3, "resources.scorer_actors": 2}).resources
    assert actor_resources(res, "sampler") == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert actor_resources(res, "scorer") == {"num_cpus": 2.0, "num_gpus": 0.25}  # four scorers share a GPU
    assert stage_resources(res, "sampler").actors == 3 and stage_resources(res, "scorer").actors == 2


def test_a_gpu_scorer_beside_cpu_samplers():
    res = make_config("tiny", {"resources.scorer_gpus_per_actor": 1.0}).resources
    assert actor_resources(res, "sampler")["num_gpus"] is None and actor_resources(res, "scorer")["num_gpus"] == 1.0
    assert stage_resources(res, "scorer").use_gpu and not stage_resources(res, "sampler").use_gpu
    with pytest.raises(GenerateError, match="sampler, scorer"):
        actor_resources(res, "writer")
