"""The one-line summary `raylab generate` prints (pure)."""
from pathlib import Path

from raylab.config import GenerateConfig
from raylab.pipeline.generate_job import GenerateOutcome
from raylab.pipeline.actors import JobSpec


def outcome(**kw) -> GenerateOutcome:
    spec = JobSpec("edm", "ckpt", GenerateConfig(), plan=None, scorer=None, store="s", use_gpu=False, identity={},
                   note=kw.pop("note", ""))
    fields = dict(store=Path("/data/store"), identity_hash="ab12" * 16, spec=spec, shards_written=3,
                  shards_present=2, images_written=600, seconds=4.0, sample_seconds=6.0, sampler_actors=2)
    return GenerateOutcome(**(fields | kw))


def test_summary_names_images_shards_throughput_and_the_store():
    text = outcome().summary()
    assert text.startswith("generate: 600 images in 3 shards (2 already present) in 4.0 s = 150.0 images/s")
    assert "samplers busy 75%" in text and "/data/store" in text and "ab12ab12ab12" in text
    assert "fd_" not in text and ";" not in text


def test_summary_adds_quality_and_the_note():
    text = outcome(quality={"fd_scorer_features": 12.3456, "fid_inception": 3.0}, note="scoring off").summary()
    assert "; fd_scorer_features 12.35; fid_inception 3 (vs real test images); scoring off" in text
    assert outcome(seconds=0.0).images_per_s == 0.0 and "= 0.0 images/s" in outcome(seconds=0.0).summary()
