"""RobustBench interop: DMWideResNet key layout, strict round trips of every checkpoint form, `raylab eval` on an
exported file giving the run's own numbers, one-line errors."""
from pathlib import Path

import numpy as np
import pytest
import torch

from raylab.config import to_json
from raylab.presets import make_config
from raylab.data.datasets import get_dataset
from raylab.eval.export import ExportError, export_robustbench, load_robustbench_checkpoint, read_state_dict
from raylab.eval.chunk import to_float
from raylab.eval.job import run_eval
from raylab.models import create_model

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def dm_wide_resnet_keys(depth: int, width: int) -> set[str]:
    """The state_dict keys of RobustBench's DMWideResNet, spelled out from its structure (dm_wide_resnet.py):
    init_conv; 3 groups of (depth - 4) / 6 blocks, each BN-conv-BN-conv plus a 1x1 `shortcut` conv when the width
    changes; a final `batchnorm` and `logits`. mean/std are plain attributes there, so not keys."""
    widths, per_group = (16, 16 * width, 32 * width, 64 * width), (depth - 4) // 6
    keys = {"init_conv.weight", "logits.weight", "logits.bias"} | {f"batchnorm.{k}" for k in BN}
    for g in range(3):
        for b in range(per_group):
            p = f"layer.{g}.block.{b}."
            keys |= {p + f"batchnorm_{i}.{k}" for i in (0, 1) for k in BN} | {p + "conv_0.weight", p + "conv_1.weight"}
            if b == 0 and widths[g] != widths[g + 1]:
                keys.add(p + "shortcut.weight")
    return keys


def write_run(root: Path, name: str = "wrn-16-2"):
    """A run directory written by hand: config.json + best.pt of a `name` WRN whose BN statistics are not the
    defaults (a loader that dropped buffers would be caught)."""
    path = root / "train" / "train-export"
    path.mkdir(parents=True)
    (path / "config.json").write_text(to_json(make_config("tiny", {"tracking.root": str(root),
                                                                    "model.name": name})))
    spec = get_dataset("digits")
    torch.manual_seed(2)
    model = create_model(name, num_classes=10, mean=spec.mean, std=spec.std).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"model": model.state_dict(), "epoch": 5, "metrics": {"val_robust_acc": 0.5}}, path / "best.pt")
    return path, model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs"))


@pytest.mark.parametrize("name, width", [("wrn-10-1", 1), ("wrn-10-2", 2)])
def test_the_toy_wrns_round_trip_through_the_robustbench_layout_strictly(tmp_path, name, width):
    """The embedded default's small WRNs are DMWideResNets too (depth 10: one block per group)."""
    path, model = write_run(tmp_path, name)
    out = export_robustbench(path, tmp_path / "rb.pt")
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == dm_wide_resnet_keys(10, width)
    loaded = load_robustbench_checkpoint(out, name, "digits")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_has_the_dmwideresnet_layout_and_loads_back_strictly(run, tmp_path):
    path, model = run
    out = export_robustbench(path, tmp_path / "rb.pt")
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == dm_wide_resnet_keys(16, 2)
    assert ckpt["mean"] == pytest.approx(get_dataset("digits").mean) and ckpt["raylab"]["epoch"] == 5
    assert ckpt["raylab"]["activation"] == "silu" and ckpt["raylab"]["num_classes"] == 10
    loaded = load_robustbench_checkpoint(out, "wrn-16-2", "digits")
    assert not loaded.training and same_state(loaded.state_dict(), model.state_dict())
    x = to_float(get_dataset("digits").load(Path("data"), False)[1].images[:4])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_every_checkpoint_form_loads_to_the_same_model(run, tmp_path):
    """Raw state_dict, RobustBench's {"state_dict"} with DataParallel's `module.` prefix and no mean/std, and an
    export that keeps the buffers inside the state_dict."""
    path, model = run
    state = model.state_dict()
    forms = {"raw.pt": state,
             "rb_module.pt": {"state_dict": {f"module.{k}": v for k, v in state.items() if k not in ("mean", "std")}}}
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
    export_robustbench(path, tmp_path / "buffers.pt", normalization_buffers=True)
    assert {"mean", "std"} <= set(read_state_dict(tmp_path / "buffers.pt")[0])
    for name in (*forms, "buffers.pt"):
        loaded = load_robustbench_checkpoint(tmp_path / name, "wrn-16-2", "digits")
        assert same_state(loaded.state_dict(), state), name


def test_exported_checkpoint_evaluates_exactly_like_its_run(run, tmp_path):
    path, _ = run
    settings = {"eval.num_test": 8, "eval.chunk_size": 4, "eval.pgd_steps": 2, "eval.autoattack": "none"}
    from_run = run_eval(path, settings, tmp_path / "a", engine="local", track=False)
    exported = export_robustbench(path, tmp_path / "rb.pt")
    from_file = run_eval(exported, {**settings, "model.name": "wrn-16-2", "data.dataset": "digits"},
                         tmp_path / "b", preset="tiny", engine="local", track=False)
    a, b = from_run.result, from_file.result
    assert np.array_equal(a.clean, b.clean) and np.array_equal(a.pgd, b.pgd) and a.clean_acc > 0
    assert b.header.checkpoint == "rb.pt" and a.header.checkpoint == "best" and a.header.epoch == 5
    assert from_file.out_dir.parent == tmp_path / "b"


def test_bad_checkpoints_and_arguments_fail_in_one_line(run, tmp_path):
    path, _ = run
    with pytest.raises(ExportError, match="does not fit wrn-28-10"):
        load_robustbench_checkpoint(path / "best.pt", "wrn-28-10", "digits")
    with pytest.raises(ExportError, match="is not a file"):
        load_robustbench_checkpoint(tmp_path / "missing.pt", "wrn-16-2", "digits")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ExportError, match="holds a list"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(ExportError, match="last.pt is missing"):
        export_robustbench(path, tmp_path / "x.pt", which="last")
    with pytest.raises(ExportError, match="which: 'middle'"):
        export_robustbench(path, tmp_path / "x.pt", which="middle")
    assert not (tmp_path / "x.pt").exists()
