"""The thin CLI: verbs are wired to their rooms, bad input is one line and exit code 2, no traceback; the README
says exactly which options each verb takes; a verb's terminal shows its progress, not Ray's chatter."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from raylab.cli import main


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "raylab", *args], capture_output=True, text=True, timeout=timeout)


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


CONFIG_OPTIONS = {"--preset", "--miniature", "--config", "--set"}  # README: "*config* is ..."
README = Path(__file__).resolve().parents[1] / "README.md"


def _parser_options(parser) -> set[str]:
    return {a.option_strings[-1] for a in parser._actions if a.option_strings and "--help" not in a.option_strings}


def _verb_parsers():
    import argparse

    from raylab.cli import VERBS, build_parser

    def sub(parser, word):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    out = {}
    for name in VERBS:
        parser = build_parser()
        for word in name.split():
            parser = sub(parser, word)
        out[name] = parser
    return out


def _readme_verb_table(verbs) -> dict[str, set[str]]:
    """verb -> the options its README row names (`*config*` stands for CONFIG_OPTIONS, `none` for none)."""
    section = README.read_text().split("## Verbs", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`raylab "):
            continue
        words = cells[0].strip("`").split()[1:]
        name = next(" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in verbs)
        assert name not in rows, f"README: two rows for `raylab {name}`"
        named = {m.split()[0] for m in re.findall(r"`(--[^`]+)`", cells[1])}
        rows[name] = named | (CONFIG_OPTIONS if "*config*" in cells[1] else set())
    return rows


def test_the_readme_verb_table_says_exactly_which_options_each_verb_takes():
    parsers = _verb_parsers()
    table = _readme_verb_table(parsers)
    assert sorted(table) == sorted(parsers)  # every verb, once
    for name, parser in parsers.items():
        assert table[name] == _parser_options(parser), f"README row of `raylab {name}`"
    assert "--set" not in _parser_options(parsers["data verify"])  # what the README used to promise every verb


def test_the_readme_says_which_options_the_experiment_scripts_take():
    import runpy

    from raylab.tune.experiment import build_parser

    ablation = runpy.run_path(str(README.parent / "experiments" / "ablate_steps.py"), run_name="x")["ABLATION"]
    sentence = re.search(r"Every experiment script takes (.*?)\(", " ".join(README.read_text().split()))[1]
    assert set(re.findall(r"`(--[\w-]+)`", sentence)) == _parser_options(build_parser(ablation))


def test_train_prints_its_progress_not_rays_chatter(tmp_path):
    """`raylab train` as a user runs it (its own Ray): the epoch line and the summary, none of Ray's INFO lines
    (worker group, process group, checkpoints, the core_worker E-line), no traceback; `--verbose` would add them."""
    proc = run_cli("train", "--preset", "smoke", "--set", "train.ratio=1", "--set", "train.epochs=2",
                   "--set", f"tracking.root={tmp_path}", timeout=600)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-30:])
    assert sum("epoch 1/2" in line for line in lines) == 1 and sum("epoch 2/2" in line for line in lines) == 1
    assert any(line.startswith("MLflow run: ") for line in lines)
    noise = [line for line in lines if any(s in line for s in ("Requesting resources", "worker group", "local_rank=",
                                                                 "Setting up process group", "Checkpoint successfully",
                                                                 "Progress bars disabled", "max_restarts > 0",
                                                                 "Traceback", "database tables"))]
    assert not noise and len(lines) <= 10, "\n".join(lines)
