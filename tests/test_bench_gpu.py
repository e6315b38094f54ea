"""bench/gpu.py runs every section tiny on CPU (`--device cpu --quick`): what its GPU run will execute, minus the
compiler's codegen and the minutes-long end-to-end smoke (which says it was skipped)."""
import importlib.util
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<rate>[\d.]+) img/s\s+(?P<gflop>[\d.]+) GFLOP/img")


def test_the_gpu_bench_runs_every_section_on_cpu(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--quick", "--budget-s", "3600"]) == 0
    out = capsys.readouterr().out
    rows = {m["name"].strip(): (float(m["rate"]), float(m["gflop"])) for m in map(ROW.match, out.splitlines()) if m}
    expected = {f"{kind} {p}" for kind in ("sample", "step", "apgd-ce") for p in ("fp32", "tf32", "bf16")}
    expected |= {"step bf16 deterministic"} | {f"step {p} compiled" for p in ("fp32", "tf32", "bf16")}
    assert set(rows) == expected, out
    assert all(rate > 0 and gflop > 0 for rate, gflop in rows.values())
    # FLOPs are counted once per workload: every precision of it does the same arithmetic.
    assert len({gflop for name, (_, gflop) in rows.items() if name.startswith("step")}) == 1
    assert "skipped under --device cpu --quick" in out
