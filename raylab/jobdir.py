"""What `ray job submit --working-dir` ships: the checkout's tracked files, staged in a directory of their own.

`ray job submit --working-dir .` uploads every file of the directory that .gitignore does not exclude: from a
checkout holding a 3.8 GB virtualenv not named `.venv`, `raylab rehearse` failed after minutes with a 40-line
traceback ending in "413: Maximum request body size exceeded" (Ray's dashboard takes at most 100 MiB per request).
A staged copy of what git tracks ships the package, its assets and experiments/, and nothing a user keeps beside
them; outside a git checkout, the package and experiments/ (FALLBACK). A stage beyond the upload limit is refused in
one line naming its largest parts, before anything is copied.

    JOB=$(python -m raylab.jobdir) && ray job submit --working-dir "$JOB" -- python experiments/...
"""
from __future__ import annotations

import collections
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

UPLOAD_LIMIT = 100 * 1024**2  # ray_constants.DASHBOARD_CLIENT_MAX_SIZE (Ray 2.60): the dashboard's request limit
FALLBACK = ("raylab", "experiments", "pyproject.toml", "README.md")


class JobDirError(ValueError):
    """One line: the job's code is too big to ship, and what is big."""


def job_files(checkout: Path) -> list[str]:
    """Paths (relative to `checkout`) of the files to ship: what git tracks, as the working tree has them (a tracked
    file deleted there is left out); where git lists nothing, FALLBACK's files without byte code."""
    try:
        out = subprocess.run(["git", "-C", str(checkout), "ls-files", "-z"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        out = None
    tracked = [name for name in out.stdout.decode().split("\0") if name and (checkout / name).is_file()] \
        if out is not None and out.returncode == 0 else []
    if tracked:  # (git refuses a checkout another user owns, e.g. under sudo: then FALLBACK)
        return tracked
    found = []
    for top in FALLBACK:
        paths = [checkout / top] if (checkout / top).is_file() else sorted((checkout / top).rglob("*"))
        found += [str(p.relative_to(checkout)) for p in paths
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return found


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"


def check_size(checkout: Path, names: list[str], limit: int | None = None) -> int:
    """The bytes to ship; JobDirError naming the largest top-level parts when they exceed `limit` (UPLOAD_LIMIT)."""
    limit = UPLOAD_LIMIT if limit is None else limit
    parts: collections.Counter[str] = collections.Counter()
    for name in names:
        top, _, rest = name.partition("/")
        parts[top + ("/" if rest else "")] += (checkout / name).stat().st_size
    total = sum(parts.values())
    if total > limit:
        big = ", ".join(f"{part} {_mib(size)}" for part, size in parts.most_common(3))
        raise JobDirError(f"job code: the {len(names)} files to ship from {checkout} hold {_mib(total)}, over the "
                          f"{_mib(limit)} `ray job submit` uploads; largest: {big} (keep data, runs and environments "
                          "out of git: data.root and tracking.root live on the shared root)")
    return total


def stage(checkout: Path, dest: Path, limit: int | None = None) -> Path:
    """Copy the job's files (`job_files`) from `checkout` into `dest`, replacing what was there; returns `dest`.
    Built beside it and renamed into place, so a stage is never half there."""
    checkout, dest = Path(checkout).resolve(), Path(dest).resolve()
    names = job_files(checkout)
    check_size(checkout, names, limit)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}")
    for name in names:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkout / name, tmp / name)
    tmp.mkdir(parents=True, exist_ok=True)  # an empty checkout still stages an (empty) directory
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """`python -m raylab.jobdir [DEST]`: stage the current directory's job files into DEST (default: a new temporary
    directory) and print its path; a refusal is one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    dest = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="raylab-job-")) / "job"
    try:
        print(stage(Path.cwd(), dest))
    except JobDirError as err:
        print(f"raylab.jobdir: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
