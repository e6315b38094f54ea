"""Headless Debian `chromium` for tests: the DOM a page renders (after its scripts ran) and a screenshot.

The browser is the system's (`.ci/run` installs Debian's `chromium` with apt-get when missing); nothing downloads
one at run time. `--virtual-time-budget` lets the page's JavaScript (the MLflow UI is a single-page app) fetch and
render before the DOM is dumped.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BUDGET_MS = 20_000


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, *extra: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="raylab-chromium-") as profile:
        args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1600,1000",
                f"--virtual-time-budget={BUDGET_MS}", *extra, url]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=True)


def dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran."""
    return _run(url, "--dump-dom").stdout


def screenshot(url: str, path: str | os.PathLike) -> Path:
    """A PNG of the rendered page."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--screenshot={path}")
    return path


def output_dir(default: Path) -> Path:
    """Where tests keep their screenshots: $RAYLAB_TEST_OUTPUT (set by .ci/run), else `default`."""
    return Path(os.environ.get("RAYLAB_TEST_OUTPUT") or default)
