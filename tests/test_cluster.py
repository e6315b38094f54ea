"""The shared-root check (raylab.cluster): a task on every node reads a token the driver wrote under the root."""
import os
import stat

import pytest

from raylab.cluster import CHECK_DIR, SharedRootError, check_shared_root, probe_root, problem_line
from raylab.io import atomic_write_text


def test_every_node_of_the_session_sees_the_root_and_no_token_is_left(ray_session, tmp_path):
    check_shared_root(tmp_path)
    assert not (tmp_path / CHECK_DIR).exists()


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
