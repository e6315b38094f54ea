"""RobustBench interop: export a run's EMA weights as a DMWideResNet checkpoint, and load such checkpoints.

Facts this module relies on (read in RobustBench `model_zoo/architectures/dm_wide_resnet.py` and `utils.py`):

* `DMWideResNet` names its modules `init_conv`, `layer.{g}.block.{b}.{batchnorm_0, conv_0, batchnorm_1, conv_1,
  shortcut}`, `batchnorm`, `logits`; raylab's WideResNet uses the same names, shapes and block semantics
  (raylab/models/wideresnet.py), so its weights are DMWideResNet's tensors under DMWideResNet's keys.
* `DMWideResNet` keeps `mean`/`std` as plain tensor attributes, not buffers, so they are *not* in its state_dict,
  and `robustbench.utils.load_model` loads with `strict=True`: a state_dict carrying `mean`/`std` would be refused
  ("Unexpected key(s)"). raylab keeps them as (3, 1, 1) buffers. The export therefore writes the weights without
  them (default) and records mean/std beside the state_dict; `normalization_buffers=True` keeps them inside, for
  loaders that register buffers (raylab's own loader accepts both).
* `load_model` reads `checkpoint["state_dict"]` when present (else the checkpoint itself) and strips `module.`.

Exported file (`torch.save`): `{"state_dict": ..., "mean": [3 floats], "std": [3 floats], "raylab": {model,
dataset, num_classes, activation, epoch, metrics, source}}`. In RobustBench terms:
`DMWideResNet(num_classes=10, depth=28, width=10, activation_fn=Swish, mean=ckpt["mean"], std=ckpt["std"])`
then `.load_state_dict(ckpt["state_dict"], strict=True)` (raylab's "silu" is DMWideResNet's `Swish`, "relu" its
default `nn.ReLU`).

Evaluating a RobustBench-format checkpoint with raylab (the checkpoint file is the target; the config names the
architecture and the dataset, whose registered mean/std are used when the file carries none):

    raylab eval Wang2023Better_WRN-28-10.pt --preset paper --set model.name=wrn-28-10 \
        --set data.dataset=cifar10 --set model.activation=silu --set eval.num_test=1000

Results go to `<checkpoint dir>/eval/<fingerprint>/` (or `--out DIR`); the table is printed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from raylab.config import from_json
from raylab.data.datasets import get_dataset
from raylab.io import atomic_write, sha256_file
from raylab.models import create_model, load_reference_state_dict, strip_wrappers

NORMALIZATION_KEYS = ("mean", "std")
# Where known checkpoint formats keep the weights: raylab run checkpoints ("model"), RobustBench / most
# research code ("state_dict"), and a common alternative ("model_state_dict"); otherwise the file is the dict.
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
WHICH = ("best", "last")


class ExportError(ValueError):
    """A one-line message naming the checkpoint file or argument at fault and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# Reading any supported checkpoint file.

def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, everything else at the top level) of a checkpoint file, loaded safely (`weights_only`)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint: {path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint or an unsafe pickle
        raise ExportError(f"checkpoint: {path} is not a loadable torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ExportError(f"checkpoint: {path} holds a {type(obj).__name__}, expected a dict (a state_dict)")
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            return dict(obj[key]), {k: v for k, v in obj.items() if k != key}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), {}
    raise ExportError(f"checkpoint: {path} has no state_dict (looked for {', '.join(STATE_DICT_KEYS)} or a flat "
                      "dict of tensors)")


def _stats(meta: dict[str, Any], state: dict[str, torch.Tensor], key: str, default: Sequence[float]) -> tuple:
    """mean or std: beside the state_dict, else inside it, else the dataset's registered value."""
    value = meta.get(key, strip_wrappers(state).get(key))
    if value is None:
        return tuple(default)
    return tuple(float(v) for v in torch.as_tensor(value).flatten())


def load_checkpoint_model(path: str | os.PathLike, model_name: str, *, num_classes: int, mean: Sequence[float],
                          std: Sequence[float], activation: str = "silu") -> nn.Module:
    """A registered model with the checkpoint's weights, loaded strictly, in eval mode, on the CPU.

    `mean`/`std` are used only when the file carries none (beside or inside its state_dict).
    """
    state, meta = read_state_dict(path)
    model = create_model(model_name, num_classes=num_classes, mean=_stats(meta, state, "mean", mean),
                         std=_stats(meta, state, "std", std), activation=activation)
    try:
        load_reference_state_dict(model, state)
    except RuntimeError:
        raise ExportError(f"checkpoint: {path} does not fit {model_name} with {num_classes} classes "
                          f"({_mismatch(model.state_dict(), strip_wrappers(state))})") from None
    return model.eval()


def _mismatch(own: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """A one-line summary of why a state_dict does not load (torch lists every key, hundreds for a WRN)."""
    found = {"missing keys": [k for k in own if k not in got and k not in NORMALIZATION_KEYS],
             "unexpected keys": [k for k in got if k not in own],
             "shape mismatches": [k for k in own if k in got and own[k].shape != got[k].shape]}
    return "; ".join(f"{len(keys)} {what}, e.g. {keys[0]}" for what, keys in found.items() if keys)


def load_robustbench_checkpoint(path: str | os.PathLike, model_name: str, dataset: str, *,
                                activation: str = "silu") -> nn.Module:
    """Load a RobustBench-format checkpoint (or a raylab `best.pt`/`last.pt`, or an export) into `model_name`.

    Accepts `{"state_dict": ...}`, `{"model_state_dict": ...}`, raylab's `{"model": ...}` or a bare state_dict,
    with or without `module.` prefixes and `mean`/`std` entries; without them the dataset's registered
    normalization is used (RobustBench's CIFAR-10/100 values equal raylab's). Returns the model in eval mode.
    """
    spec = get_dataset(dataset)
    return load_checkpoint_model(path, model_name, num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
                                 activation=activation)


# ---------------------------------------------------------------------------------------------------------------
# Export.

def export_robustbench(run_dir: str | os.PathLike, out_path: str | os.PathLike, which: str = "best", *,
                       normalization_buffers: bool = False) -> Path:
    """Write run `run_dir`'s EMA weights (`best.pt` or `last.pt`) as a RobustBench DMWideResNet checkpoint.

    The weights are validated by loading them strictly into the run's architecture first; the file is written
    atomically. Returns `out_path`.
    """
    if which not in WHICH:
        raise ExportError(f"which: {which!r} is not one of {', '.join(WHICH)}")
    run = Path(run_dir)
    config, weights = run / "config.json", run / f"{which}.pt"
    for needed in (config, weights):
        if not needed.is_file():
            raise ExportError(f"export: {needed} is missing (a training run directory holds config.json, "
                              "best.pt and last.pt)")
    cfg = from_json(config.read_text())
    if not cfg.model.name.startswith("wrn-"):
        raise ExportError(f"export: model {cfg.model.name!r} has no RobustBench DMWideResNet layout (WRNs only)")
    model = load_robustbench_checkpoint(weights, cfg.model.name, cfg.data.dataset, activation=cfg.model.activation)
    state = {k: v for k, v in model.state_dict().items() if normalization_buffers or k not in NORMALIZATION_KEYS}
    _, meta = read_state_dict(weights)
    payload = {"state_dict": state, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
               "raylab": {"model": cfg.model.name, "dataset": cfg.data.dataset, "activation": cfg.model.activation,
                          "num_classes": int(model.logits.out_features), "which": which,
                          "epoch": meta.get("epoch"), "metrics": meta.get("metrics", {}),
                          "source": str(weights.resolve()), "source_sha256": sha256_file(weights)}}
    out = Path(out_path)
    atomic_write(out, lambda tmp: torch.save(payload, tmp))
    return out


# ---------------------------------------------------------------------------------------------------------------
# RobustBench model-info JSON (the stub of `model_info/<dataset>/<threat model>/<name>.json` in RobustBench's zoo).

EXPORT_NAME, INFO_NAME = "model.pt", "model_info.json"
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}


def _evaluation(run: Path, which: str) -> dict[str, Any] | None:
    """The newest `eval/*/summary.json` of checkpoint `which` in the run directory, if any."""
    found = []
    for path in run.glob("eval/*/summary.json"):
        summary = json.loads(path.read_text())
        if summary.get("header", {}).get("checkpoint") == which:
            found.append((path.stat().st_mtime, summary))
    return max(found, key=lambda f: f[0])[1] if found else None


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.2f}"


def model_info(run_dir: str | os.PathLike, which: str = "best") -> dict[str, Any]:
    """The fields RobustBench's model-info files carry (threat model, eps, dataset, architecture, clean and
    AutoAttack accuracy), filled from the run's config and its evaluation when present; `raylab` says over how
    many test images and which AutoAttack version the numbers were measured (RobustBench lists standard AA over
    the full test set only: anything else is marked in the footnote)."""
    run = Path(run_dir)
    cfg = from_json((run / "config.json").read_text())
    ev = _evaluation(run, which)
    header, metrics = (ev or {}).get("header", {}), (ev or {}).get("metrics", {})
    prefix = "eval_last_" if which == "last" else "eval_"
    aa = next((v for k, v in metrics.items() if k.startswith(f"{prefix}aa_") and k.endswith("_acc")
               and "_after_" not in k), None)
    n = (ev or {}).get("n")
    version = header.get("autoattack")
    depth, width = cfg.model.name.split("-")[1:3] if cfg.model.name.startswith("wrn-") else ("?", "?")
    eps = header.get("eps", cfg.attack.eps)
    footnote = ("not evaluated yet (run `raylab eval`)" if ev is None else
                f"raylab evaluation of {n} test images, AutoAttack version {version}"
                + ("" if version == "standard" else " (not the standard version RobustBench lists)"))
    return {"link": "", "name": f"raylab {run.name}", "authors": "", "additional_data": cfg.train.ratio < 1.0,
            "number_forward_passes": 1, "dataset": cfg.data.dataset,
            "threat_model": THREAT_MODELS[header.get("norm", cfg.attack.norm)],
            "eps": f"{round(eps * 255)}/255" if abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:g}",
            "architecture": f"WideResNet-{depth}-{width}" + ("-SiLU" if cfg.model.activation == "silu" else ""),
            "clean_acc": _percent(metrics.get(f"{prefix}clean_acc")), "reported": _percent(aa),
            "autoattack_acc": _percent(aa), "unreliable": False, "footnote": footnote,
            "raylab": {"checkpoint": which, "epoch": header.get("epoch"), "test_images": n,
                       "autoattack_version": version, "autoattack_attacks": header.get("attacks"),
                       "pgd_steps": header.get("pgd_steps"), "model": cfg.model.name}}


def write_model_info(run_dir: str | os.PathLike, out_path: str | os.PathLike, which: str = "best") -> Path:
    out = Path(out_path)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(model_info(run_dir, which), indent=2) + "\n"))
    return out
