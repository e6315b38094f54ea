"""raylab.cluster: the shared-root check (a task on every node reads a token the driver wrote under the root, and
every piece of work reads it again where it runs: nodes that join later were never probed), and what the driver's
terminal shows."""
import logging
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from raylab.cluster import (CHECK_DIR, ROOT_ID, RootToken, SharedRootError, check_shared_root, check_this_node,
                            probe_root, problem_line, root_token, this_node)
from raylab.io import atomic_write_text


def test_every_node_of_the_session_sees_the_root_under_one_token_that_stays(ray_session, tmp_path):
    check_shared_root(tmp_path)
    token = root_token(tmp_path)
    check_shared_root(tmp_path)  # a second job (or driver) on the root: the same token, never rewritten
    assert root_token(tmp_path) == token and token.path == str(tmp_path / CHECK_DIR / ROOT_ID)
    assert sorted(p.name for p in (tmp_path / CHECK_DIR).iterdir()) == [ROOT_ID]  # no temp file left
    assert len(token.token) == 32 and (tmp_path / CHECK_DIR / ROOT_ID).read_text() == token.token


def test_work_refuses_a_node_without_the_root_in_one_line_naming_node_and_path(tmp_path):
    """What every Ray Train worker, actor and writer task runs first: a node that mounts nothing at the path, or
    another directory (a local one at the same path), is refused, wherever and whenever it joined."""
    shared = tmp_path / "shared"
    token = root_token(shared)
    check_this_node(token)  # this node sees it
    elsewhere = RootToken(str(tmp_path / "local"), str(tmp_path / "local" / CHECK_DIR / ROOT_ID), token.token)
    with pytest.raises(SharedRootError) as err:
        check_this_node(elsewhere)
    assert str(err.value) == (f"shared root: node {this_node()} does not see {tmp_path / 'local'}: mount "
                              "the same filesystem at the same path on every node (tracking.root)")
    root_token(tmp_path / "local")  # a directory of its own at that path: another token
    with pytest.raises(SharedRootError, match=f"sees another directory at {tmp_path / 'local'}:"):
        check_this_node(elsewhere)
    check_this_node(None)  # not on Ray (local engines, unit tests): nothing to check
    assert this_node().startswith(socket.gethostname())


def test_a_root_the_driver_cannot_write_is_refused_before_any_task(ray_session, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        check_shared_root(blocker / "root")


def test_probe_names_what_a_node_sees(tmp_path):
    token = tmp_path / "t"
    assert probe_root(str(token), "abc")[1] == "does not see"
    token.write_text("xyz")
    assert probe_root(str(token), "abc")[1] == "sees another directory at"
    token.write_text("abc")
    assert probe_root(str(token), "abc")[1] == ""


def test_the_refusal_is_one_line_naming_the_node_and_the_path():
    ok = [("head (10.0.0.1)", ""), ("w1 (10.0.0.2)", "")]
    assert problem_line("/shared", ok) is None
    line = problem_line("/shared", ok + [("w2 (10.0.0.3)", "does not see"), ("w3 (10.0.0.4)", "does not see")])
    assert "\n" not in line and "w2 (10.0.0.3) does not see /shared" in line and "1 more" in line
    assert issubclass(SharedRootError, ValueError)  # the CLI prints it as one line


def test_files_written_atomically_follow_the_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        path = atomic_write_text(tmp_path / "shared.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664  # group-readable and -writable, as the team's other files


def test_rays_chatter_is_dropped_and_everything_else_kept():
    import io

    from raylab.cluster import ChatterFilter

    sink = io.StringIO()
    out = ChatterFilter(sink)
    out.write("(run_trial pid=1) [E core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: 'x' has "
              "constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")
    out.write("(RayTrainWorker pid=2) Starting execution of Dataset dataset_0358_0. Full logs are in /tmp/x\n"
              "(RayTrainWorker pid=2) ✔️  Dataset dataset_0358_0 execution finished in 0.04 seconds\n"
              "(RayTrainWorker pid=2) Reporting training result 1: TrainingReport(metrics={'epoch': 1})\n")
    out.write("(run_trial pid=1) E RuntimeError: a real error\nepoch 1/3")
    out.write("  loss 0.5\n")
    out.write("partial")
    out.flush()
    assert sink.getvalue() == "(run_trial pid=1) E RuntimeError: a real error\nepoch 1/3  loss 0.5\npartial"


def test_the_terminal_shows_raylabs_lines_and_errors_and_verbose_shows_everything(monkeypatch, capsys):
    """The default terminal of every Ray verb and experiment script drops Ray's own INFO chatter (Ray Train's worker
    group and checkpoint lines, Ray Data's progress-bar notice) and the quiet loggers' INFO lines, never a warning,
    an error or a traceback; `--verbose` (terminal(True)) passes every line."""
    import logging

    from raylab.cluster import terminal

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    chatter = ["(TrainController pid=3) Requesting resources: {'CPU': 1.0} * 1",
               "(TrainController pid=3) Attempting to start training worker group of size 1 with the following",
               "(TrainController pid=3) - (ip=10.0.0.2, pid=5) world_rank=0, local_rank=0, node_rank=0",
               "(RayTrainWorker pid=5) Setting up process group for: env:// [rank=0, world_size=1]",
               "(RayTrainWorker pid=5) Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r)",
               "(run_trial pid=4) Progress bars disabled. To enable, set `ray.data.DataContext...`."]
    kept = ["(TrainController pid=3) [steps=2] epoch 1/3  loss 2.313  clean 15.6%  50 img/s",
            "(run_trial pid=4) Traceback (most recent call last):", "(run_trial pid=4) ValueError: a real error",
            "(MapWorker(MapBatches(SamplerActor)) pid=6) *** SIGABRT received at time=1796677098 on cpu 0 ***"]
    logger = logging.getLogger("mlflow.store.db.utils")
    with terminal():
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"  # MLflow imported later (in trials too) obeys it
        for line in chatter + kept:
            print(line)
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    assert capsys.readouterr().out.splitlines() == kept and "MLFLOW_LOGGING_LEVEL" not in os.environ
    with terminal(verbose=True):
        for line in chatter + kept:
            print(line)
    assert capsys.readouterr().out.splitlines() == chatter + kept


def test_a_trials_lines_carry_its_arm(capsys):
    from raylab.cluster import labelled

    with labelled("[steps=2] "):
        print("generate: 120 images\nmetric  accuracy", flush=True)
        print("")
    assert capsys.readouterr().out == "[steps=2] generate: 120 images\n[steps=2] metric  accuracy\n\n"


def test_workers_of_a_local_ray_know_their_own_instance(tmp_path):
    """With a second Ray instance on the machine, Ray's State API clients in workers (Ray Train's
    PlacementGroupCleaner) could not tell which instance is theirs and printed a 30-line traceback per Train run. A
    local instance started by raylab gives every worker its own address (its own process here: the session Ray of
    the tests is a second instance on this machine)."""
    script = tmp_path / "where.py"
    script.write_text("import os, ray\n"
                      "from raylab.cluster import init_ray\n"
                      "init_ray()\n"
                      "@ray.remote(num_cpus=0)\n"
                      "def where():\n"
                      "    from ray._private.services import canonicalize_bootstrap_address_or_die\n"
                      "    return os.environ.get('RAY_ADDRESS'), canonicalize_bootstrap_address_or_die(None)\n"
                      "print(*ray.get(where.remote()), ray.get_runtime_context().gcs_address)\n")
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    pinned, found, own = out.stdout.split()
    assert pinned == found == own


def test_every_ray_train_worker_checks_root_and_dataset_before_its_first_step(tmp_path):
    """The trainers hand the driver's token to their workers; a worker checks it, then the dataset's files, before
    anything else (here outside Ray: the check comes before the worker even asks Ray Train for its rank)."""
    from raylab.config import to_flat
    from raylab.data.datasets import DatasetError
    from raylab.presets import make_config
    from raylab.raytrain import ROOT_KEY, make_trainer, worker_preflight
    from raylab.runs import run_dir
    from raylab.train.edm_worker import edm_worker
    from raylab.train.worker import train_worker

    cfg = make_config("tiny", {"tracking.root": str(tmp_path / "runs")})
    trainer = make_trainer(train_worker, {"flat": to_flat(cfg)}, cfg, run_dir(cfg, "train", "preflight"))
    token = root_token(tmp_path / "runs")
    assert trainer.train_loop_config[ROOT_KEY] == token
    elsewhere = RootToken(str(tmp_path / "gone"), str(tmp_path / "gone" / CHECK_DIR / ROOT_ID), token.token)
    refused = re.escape(f"node {this_node()} does not see {tmp_path / 'gone'}: mount")
    for worker in (train_worker, edm_worker):
        with pytest.raises(SharedRootError, match=refused):
            worker({"flat": to_flat(cfg), ROOT_KEY: elsewhere})
    cifar = make_config("tiny", {"data.dataset": "cifar10", "data.root": str(tmp_path / "data")})
    with pytest.raises(DatasetError, match=re.escape(f"data.dataset=cifar10 on node {this_node()}: {tmp_path}/data/")):
        worker_preflight(cifar, {ROOT_KEY: token})
    worker_preflight(cfg, {ROOT_KEY: token})  # digits, and a node that sees the root: nothing to refuse


def test_rays_log_dedup_keeps_each_trials_line_apart():
    """Ray's driver merged `[steps=2] epoch 3/12 ...` into `[steps=8] epoch 3/12 ...` (they differ only in words with
    digits) while trials ran side by side; importing raylab tells Ray to print every labelled line. Ray's own
    deduplicator, with and without that setting."""
    import raylab  # noqa: F401
    from ray._private.ray_logging import LogDeduplicator

    def printed(allow):
        dedup = LogDeduplicator(5, allow, None, _timesource=lambda: 0.0)
        out = []
        for pid, label in ((1, "steps=2"), (2, "steps=8"), (3, "steps=4")):
            batch = {"ip": "127.0.0.1", "pid": pid, "task_name": "x", "lines": [f"[{label}] epoch 3/12  loss 2.283"]}
            out += [line for b in dedup.deduplicate(batch) for line in b["lines"]]
        return out

    assert len(printed(os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"])) == 3
    assert len(printed(None)) == 1  # Ray's default: the other two arms' lines vanish


def test_only_a_stats_actor_call_is_dropped_of_rays_unhandled_errors(caplog):
    """Ray Data's _StatsActor sometimes gets a dataset's metrics before its registration (trials side by side): its
    unhandled KeyError is dropped; any other unhandled error still reaches the log. Ray's own handler."""
    from ray._private.worker import _unhandled_error_handler

    from raylab.cluster import drop_stats_actor_errors

    drop_stats_actor_errors()
    drop_stats_actor_errors()  # once per process
    with caplog.at_level("ERROR", logger="ray._private.worker"):
        _unhandled_error_handler(RuntimeError("ray::_StatsActor.update_execution_metrics() ... KeyError: 'dataset_1'"))
        _unhandled_error_handler(RuntimeError("ray::EvalActor.__call__() ... ValueError: bad"))
    assert [r.getMessage()[-12:] for r in caplog.records] == ["ValueError: bad"[-12:]]
    assert len(logging.getLogger("ray._private.worker").filters) == 1
