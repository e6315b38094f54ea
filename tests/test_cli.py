"""The thin CLI: verbs are wired to their rooms, bad input is one line and exit code 2, no traceback."""
import subprocess
import sys

import numpy as np

from raylab.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "raylab", *args], capture_output=True, text=True, timeout=120)


def test_config_prints_flat_keys_and_rejects_bad_keys(capsys):
    assert main(["config", "--preset", "paper", "--set", "train.lr=0.3"]) == 0
    out = capsys.readouterr().out
    assert "train.lr=0.3\n" in out and "model.name=wrn-28-10\n" in out
    proc = run_cli("config", "--set", "train.ratoi=0.5")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "raylab: error: train.ratoi: unknown config key (did you mean 'train.ratio'?)"


def test_import_npz_then_verify_then_corrupt(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "gen.npz"
    np.savez(npz, image=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, 50))
    out = tmp_path / "shards"
    assert main(["data", "import-npz", str(npz), str(out), "--shard-size", "20"]) == 0
    assert main(["data", "verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = sorted(out.glob("gen-*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert shard.name in text and "1 problem" in text


def test_missing_input_is_one_line():
    proc = run_cli("data", "verify", "/nonexistent/store")
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr + proc.stdout
