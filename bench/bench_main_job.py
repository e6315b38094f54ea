"""The main job's wall time and CPU time, before and after a change, side by side in one run (ratios: the machine
is noisy, so the variants alternate and each is compared within its own round).

    python bench/bench_main_job.py [--before REF] [--after REF] [--rounds 1] [--set KEY=VALUE ...]
                                   [--before-set KEY=VALUE ...]

Each round runs `experiments/ablate_steps.py` (the main job, `--preset tiny` unless `--set` says otherwise) once
per variant, each in a fresh directory (nothing reused: generation, training and evaluation all run):

* before: the code at git REF (default HEAD, a temporary worktree) with `--before-set` overrides;
* after:  the code at git REF given by `--after` (default: this checkout as it is), with `--set` overrides.

CPU time is every process of the run summed: the driver and all of Ray's (they are found by a marker in their
environment, which Ray's processes inherit from the driver), sampled every 0.5 s from /proc, so a process that lives
under 0.5 s is missed. The printed table and the wall times come from the runs themselves.

Measured 2026-12-08, one round, `--before 89cfaae --after 6dca811` (trials one after another on 2 threads each vs
side by side on 1 thread each), while another engineer's jobs kept the load average at 10-40:

     variant  wall s   CPU s   lines
      before  1205.5  1407.6     97
       after   586.2  1066.3     90      after/before: wall x0.49, CPU x0.76

    after, CPU s by kind: RayTrainWorker 510.8, EvalActor 189.4, SamplerActor 45.4, IDLE workers 38.6, trial drivers
    37.2 + 19.4, TrainController 31.7, _QueueActor 27.7, PlacementGroupCleaner 17.9, ScorerActor 15.4, log_monitor
    15.1, driver 13.9, DashboardAgent 13.1, DatasetManager 12.0 (before: RayTrainWorker 874.1 on 2 threads each)

Under that load 2-thread workers lose most (OpenMP threads wait on each other); with nothing else running the main
job took 10 min 44 s before and 9 min 9 s after (a fresh clone each, `/usr/bin/time`).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "RAYLAB_BENCH_MARK"
TICK = os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of every process whose environment holds `MARK=<token>`, by process kind."""

    def __init__(self, token: str):
        self.needle = f"{MARK}={token}".encode()
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                self._sample(int(pid))

    def _sample(self, pid: int) -> None:
        try:
            if self.needle not in Path(f"/proc/{pid}/environ").read_bytes():
                return
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return
        fields = stat[stat.rfind(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        self.seen[pid] = (kind(cmd), max(cpu, self.seen.get(pid, ("", 0.0))[1]))

    def by_kind(self) -> dict[str, float]:
        total: dict[str, float] = collections.Counter()
        for name, cpu in self.seen.values():
            total[name] += cpu
        return dict(total)


def kind(cmd: str) -> str:
    """What a process is: Ray names its workers `ray::<actor or task>`; the rest by their program."""
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "default_worker", "runtime_env"):
        if name in cmd:
            return name
    return "driver" if "ablate_steps.py" in cmd else cmd[:40]


def run_variant(code: Path, overrides: list[str], out: Path, token: str) -> dict:
    env = {**os.environ, MARK: token, "PYTHONPATH": str(code), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, str(code / "experiments" / "ablate_steps.py"), *sum((["--set", s] for s in overrides), [])]
    out.mkdir(parents=True)
    with CpuMeter(token) as meter:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{code}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall": wall, "cpu": meter.by_kind(), "table": table_of(proc.stdout), "lines": proc.stdout.count("\n")}


def table_of(stdout: str) -> str:
    lines = stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if re.match(r"^generate\.steps \|", line)), None)
    return "\n".join(lines[first:first + 5]) if first is not None else "(no table)"


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(where), ref], check=True)
    return where


def report(results: dict[str, list[dict]]) -> None:
    names = list(results)
    print(f"\n{'variant':>8} {'round':>5} {'wall s':>8} {'CPU s':>8} {'lines':>6}")
    for name in names:
        for i, r in enumerate(results[name]):
            print(f"{name:>8} {i + 1:5d} {r['wall']:8.1f} {sum(r['cpu'].values()):8.1f} {r['lines']:6d}")
    for i in range(len(results[names[0]])):
        before, after = results["before"][i], results["after"][i]
        print(f"round {i + 1}: after/before wall x{after['wall'] / before['wall']:.2f}, CPU "
              f"x{sum(after['cpu'].values()) / sum(before['cpu'].values()):.2f}")
    for name in names:
        cpu = results[name][-1]["cpu"]
        print(f"\n{name}: CPU seconds by process kind (last round)")
        for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])[:14]:
            print(f"  {v:7.1f}  {k}")
        print(results[name][-1]["table"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="HEAD", help="git ref of the 'before' code (default HEAD)")
    ap.add_argument("--after", default="", help="git ref of the 'after' code (default: this checkout as it is)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", dest="after_set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--before-set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-main-job-") as tmp:
        before = worktree(args.before, Path(tmp) / "before")
        try:
            after = worktree(args.after, Path(tmp) / "after") if args.after else REPO
            variants = {"before": (before, args.before_set), "after": (after, args.after_set)}
            results: dict[str, list[dict]] = {name: [] for name in variants}
            for r in range(args.rounds):
                for name, (code, sets) in variants.items():
                    results[name].append(run_variant(code, sets, Path(tmp) / f"{name}-{r}", f"{name}-{r}"))
                    print(f"round {r + 1} {name}: {results[name][-1]['wall']:.1f} s", flush=True)
            report(results)
        finally:
            for name in ("before", "after"):
                if (Path(tmp) / name).exists():
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(Path(tmp) / name)],
                                   check=False)


if __name__ == "__main__":
    main()
