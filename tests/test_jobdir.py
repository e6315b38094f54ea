"""What `ray job submit` ships (raylab.jobdir): the checkout's tracked files, never what lies beside them (a
virtualenv not named .venv made `--working-dir .` fail with "413: Maximum request body size exceeded"), and a
checkout too big to ship is refused in one line naming what is big, before anything starts."""
import subprocess
import tempfile
from pathlib import Path

import pytest

from raylab import jobdir
from raylab.jobdir import JobDirError, stage


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture()
def checkout(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "raylab").mkdir(parents=True)
    (repo / "raylab" / "__init__.py").write_text("")
    (repo / "experiments").mkdir()
    (repo / "experiments" / "ablate_x.py").write_text("print('x')\n")
    (repo / "env" / "lib").mkdir(parents=True)  # a virtualenv not named .venv: not ignored, not tracked
    (repo / "env" / "lib" / "torch.so").write_bytes(b"\0" * 300_000)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    _git(repo, "add", "raylab", "experiments")
    _git(repo, "commit", "-q", "-m", "code")
    return repo


def test_only_the_tracked_files_are_shipped(checkout, tmp_path):
    (checkout / "experiments" / "ablate_x.py").write_text("print('edited')\n")  # as the working tree has it
    (checkout / "raylab" / "new.py").write_text("")  # untracked: `git add` it to ship it
    out = stage(checkout, tmp_path / "job")
    shipped = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert shipped == ["experiments/ablate_x.py", "raylab/__init__.py"]
    assert (out / "experiments" / "ablate_x.py").read_text() == "print('edited')\n"
    _git(checkout, "add", "raylab/new.py")
    assert (stage(checkout, tmp_path / "job") / "raylab" / "new.py").is_file()  # restaged in place
    assert not list(tmp_path.glob(".job.*"))  # built beside it and renamed: nothing half-there


def test_a_checkout_too_big_to_ship_is_refused_in_one_line_naming_what_is_big(checkout, tmp_path):
    (checkout / "data").mkdir()
    (checkout / "data" / "cifar.npz").write_bytes(b"\1" * 200_000)
    _git(checkout, "add", "data")
    with pytest.raises(JobDirError) as err:
        stage(checkout, tmp_path / "job", limit=100_000)
    line = str(err.value)
    assert "\n" not in line and "over the 0.1 MiB `ray job submit` uploads" in line
    assert "largest: data/ 0.2 MiB" in line and "env/" not in line  # untracked: never shipped, never counted
    assert not (tmp_path / "job").exists()  # refused before anything is copied


def test_outside_git_the_package_and_experiments_are_shipped(checkout, tmp_path):
    plain = tmp_path / "plain"
    subprocess.run(["cp", "-r", str(checkout), str(plain)], check=True)
    subprocess.run(["rm", "-rf", str(plain / ".git")], check=True)
    (plain / "raylab" / "__pycache__").mkdir()
    (plain / "raylab" / "__pycache__" / "x.pyc").write_bytes(b"")
    out = stage(plain, tmp_path / "job")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "experiments/ablate_x.py", "raylab/__init__.py"]


def test_the_rehearsal_ships_the_staged_code_and_refuses_a_big_checkout_before_any_node(checkout, monkeypatch,
                                                                                         capsys):
    from raylab.rehearse import run

    monkeypatch.setattr(run, "preflight", lambda: None)  # privileges are another test's business
    monkeypatch.setattr(jobdir, "UPLOAD_LIMIT", 1000)
    monkeypatch.setattr(run, "_rehearse", lambda opts, cluster: pytest.fail("a node started"))
    monkeypatch.chdir(checkout)
    (checkout / "experiments" / "big.bin").write_bytes(b"\1" * 2000)
    _git(checkout, "add", "experiments")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:  # rehearsal directories may not live under /tmp
        cluster_yaml = str(Path(__file__).resolve().parents[1] / "cluster.yaml")
        assert run.rehearse(run.Options(workdir=f"{work}/rh", cluster_yaml=cluster_yaml)) == 2
        line, = capsys.readouterr().out.splitlines()
        assert line.startswith("rehearse: job code:") and "largest: experiments/" in line
        layout = run.nodes.make_layout(Path(f"{work}/rh"), "rh0001")
        assert str(run.job_dir(layout)).startswith(str(layout.node_dir("head")))  # workers do not see it
