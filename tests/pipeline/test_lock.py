"""One `raylab generate` per store: a second job fails at once, naming the store, before any compute."""
import pytest

from raylab.pipeline.generate_job import LOCK_FILE, run_generate, store_lock
from raylab.pipeline.generators import GenerateError
from raylab.io import exclusive
from tests.pipeline.helpers import job_config


def test_a_held_store_lock_stops_run_generate_before_anything_happens(assets, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with exclusive(store / LOCK_FILE):  # another job on this store
        with pytest.raises(GenerateError, match="another `raylab generate` is running") as err:
            run_generate(job_config(assets, tmp_path), store, track=False)
    assert str(store) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in store.iterdir()) == [LOCK_FILE]  # no manifest: nothing was planned or opened


def test_the_lock_is_released_on_exit_and_on_error(tmp_path):
    store = tmp_path / "store"
    with pytest.raises(KeyError):
        with store_lock(store):
            with pytest.raises(GenerateError, match=str(store)):
                with store_lock(store):
                    pass
            raise KeyError("boom")
    with store_lock(store):  # free again
        pass
