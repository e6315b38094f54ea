"""Fixtures of the pipeline tests (random weights: identity and bytes tests need no trained model)."""
from pathlib import Path

import pytest

from raylab.config import EDMConfig
from raylab.presets import make_config
from raylab.generate.checkpoint import save_edm
from raylab.generate.networks import build_edm
from tests.pipeline.helpers import TINY_EDM, save_scorer


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A random conditional and an unconditional tiny EDM, and two random scorers."""
    root = tmp_path_factory.mktemp("pipeline-assets")
    cfg = make_config("tiny")
    return {"edm": save_edm(root / "edm", build_edm(EDMConfig(**TINY_EDM)).eval()),
            "edm_uncond": save_edm(root / "edm-uncond", build_edm(EDMConfig(**TINY_EDM, conditional=False)).eval()),
            "scorer": save_scorer(root / "scorer", cfg, seed=0),
            "scorer2": save_scorer(root / "scorer2", cfg, seed=1)}


@pytest.fixture(scope="session")
def reference_run(assets, tmp_path_factory, ray_session):
    """The whole job once: 2 sampler actors, 1 scorer actor, generate.batch_size 8."""
    from raylab.pipeline.generate_job import run_generate
    from tests.pipeline.helpers import job_config

    root = tmp_path_factory.mktemp("reference-run")
    cfg = job_config(assets, root)
    return cfg, run_generate(cfg, root / "store", track=False)
