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
CHARTS_BUDGET_MS = 60_000  # measured: at 20 s MLflow's chart view had drawn no chart in 5 of 6 loads


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, *extra: str, timeout_s: float = 180, size: str = "1600,1000",
         budget_ms: int = BUDGET_MS) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="raylab-chromium-") as profile:
        args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
                f"--virtual-time-budget={budget_ms}", *extra, url]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=True)


def dump_dom(url: str, until: str | None = None, tries: int = 3, budget_ms: int = BUDGET_MS) -> str:
    """The page's DOM after its scripts ran (for `budget_ms` of the page's virtual time: MLflow's chart view draws its
    charts later than its tables); with `until`, loaded again (up to `tries` times in all) until the DOM holds that
    text."""
    for _ in range(tries if until else 1):
        dom = _run(url, "--dump-dom", budget_ms=budget_ms).stdout
        if until is None or until in dom:
            break
    return dom


def screenshot(url: str, path: str | os.PathLike, size: str = "1600,1000", budget_ms: int = BUDGET_MS) -> Path:
    """A PNG of the rendered page in a window of `size` ("width,height" pixels)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--screenshot={path}", size=size, budget_ms=budget_ms)
    return path


def output_dir(default: Path) -> Path:
    """Where tests keep their screenshots: $RAYLAB_TEST_OUTPUT (set by .ci/run), else `default`."""
    return Path(os.environ.get("RAYLAB_TEST_OUTPUT") or default)
