"""The allowlist loader on synthetic snapshots laid out like NVlabs' `edm-*.pkl` (edm.md §3), and hostile pickles.

The official weights cannot be fetched here, so each test pickles one of *our* tiny networks the way
`torch_utils.persistence` would: every module is a stub whose `__reduce__` is
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, with `meta['module_src']` a payload that would write
a marker file if anything exec'd it. The fake `torch_utils` modules exist only while pickling.
"""
import collections
import dataclasses
import io
import os
import pickle
import pickletools
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from raylab.presets import make_config
from raylab.generate.networks import build_edm
from raylab.generate.official import (AllowlistUnpickler, OfficialFormatError, UnsafePickleError,
                                      load_official_pickle, read_snapshot)



class Persistent:
    """Pickles as `reconstruct(meta)`, like a `@persistent_class` instance."""

    def __init__(self, reconstruct, meta):
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


def _fake_persistence(monkeypatch):
    """Register `torch_utils.persistence._reconstruct_persistent_obj` so pickle can name it (pickling only)."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the loader must never call the real reconstruct function")

    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = package.persistence = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    return _reconstruct_persistent_obj


def _module_state(module: nn.Module, stub) -> dict:
    """A module's `__dict__` as a persistent object's state: tensors, children as stubs, plain attributes."""
    state = {}
    for key, value in vars(module).items():
        if key == "_modules":
            state[key] = collections.OrderedDict((n, stub(c)) for n, c in value.items())
        elif key in ("_parameters", "_buffers") or "hooks" in key:
            state[key] = collections.OrderedDict(value)
        elif key == "_non_persistent_buffers_set":
            state[key] = set(value)
        elif key == "init_kwargs":
            state["_init_kwargs"], state["_init_args"] = dict(value), ()
        elif isinstance(value, (bool, int, float, str, type(None), list, tuple)):
            state[key] = value
    if "skip_scale" in state:  # UNetBlock.skip_scale is a numpy float64 in the official files
        state["skip_scale"] = np.float64(state["skip_scale"])
    return state


def _stub_tree(net: nn.Module, reconstruct, marker: str):
    src = f"open({marker!r}, 'w').write('module_src was executed')\n"

    def stub(module):
        if module is None:
            return None
        if isinstance(module, nn.ModuleDict):  # not persistent: NEWOBJ on ModuleDict + BUILD with its __dict__
            holder = nn.ModuleDict()
            holder.__dict__.update(_module_state(module, stub))
            return holder
        meta = dict(type="class", version=6, module_src=src, class_name=type(module).__name__,
                    state=_module_state(module, stub))
        return Persistent(reconstruct, meta)

    return stub(net)


def _snapshot_bytes(net, monkeypatch, marker, extra_state=None) -> bytes:
    """An edm-*.pkl-like pickle of `net` (protocol 4); the fake modules are gone when this returns."""
    with monkeypatch.context() as patch:
        reconstruct = _fake_persistence(patch)
        ema = _stub_tree(net, reconstruct, str(marker))
        ema.meta["state"].update(extra_state or {})
        loss = Persistent(reconstruct, dict(type="class", version=6, module_src="", class_name="EDMLoss",
                                            state=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)))
        data = dict(ema=ema, loss_fn=loss, augment_pipe=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))
        blob = pickle.dumps(data, protocol=4)
    assert "torch_utils" not in sys.modules
    return blob


class _Recorder(AllowlistUnpickler):
    seen: set

    def find_class(self, module, name):
        self.seen.add(f"{module}.{name}")
        return super().find_class(module, name)


def _globals(blob: bytes) -> set:
    """Every global the stream names (each resolved through the allowlist, so this also loads it)."""
    recorder = _Recorder(io.BytesIO(blob))
    recorder.seen = set()
    recorder.load()
    return recorder.seen


# edm.md §3: a protocol-4 snapshot of a SongUNet EDMPrecond names exactly these eight globals.
SNAPSHOT_GLOBALS = {"torch_utils.persistence._reconstruct_persistent_obj", "collections.OrderedDict",
                    "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2",
                    "torch.storage._load_from_bytes", "torch.nn.modules.container.ModuleDict",
                    "numpy._core.multiarray.scalar", "numpy.dtype"}


def _rename_module(blob: bytes, old: str, new: str) -> bytes:
    """Rewrite a module name as a numpy-1 writer would have named it. Frames are dropped (they are optional in
    protocol 4 and their lengths would no longer match); every other opcode is copied byte for byte."""
    ops, out = list(pickletools.genops(blob)), bytearray()
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(blob)
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg == old:
            out += b"\x8c" + bytes([len(new)]) + new.encode()
        else:
            out += blob[pos:end]
    return bytes(out)


def _tiny(arch: str) -> nn.Module:
    cfg = dataclasses.replace(make_config("tiny").edm, arch=arch, model_channels=8, augment_dim=9, seed=2)
    net = build_edm(cfg, img_resolution=16).eval()
    with torch.no_grad():  # give the near-zero output layers real values so the comparison means something
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return net


def _outputs(net):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return net(x, torch.tensor([0.1, 1.0, 20.0]), torch.eye(10)[[0, 4, 9]], augment_labels=torch.ones(3, 9))


def _write(tmp_path, blob, name="edm-test.pkl"):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_synthetic_snapshot_loads_strictly_and_reproduces_outputs(arch, tmp_path, monkeypatch):
    net, marker = _tiny(arch), tmp_path / "marker"
    blob = _snapshot_bytes(net, monkeypatch, marker)
    assert _globals(blob) == SNAPSHOT_GLOBALS  # the synthetic file has the official layout
    loaded, kwargs = load_official_pickle(_write(tmp_path, blob))
    assert kwargs == net.init_kwargs and not loaded.training
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    assert torch.equal(_outputs(loaded), _outputs(net))
    assert not marker.exists() and "torch_utils" not in sys.modules  # module_src never ran, nothing imported


def test_numpy1_scalar_names_load_too(tmp_path, monkeypatch):
    """The 2022 snapshots were written under numpy < 2, which names the scalar rebuilder numpy.core.multiarray."""
    net = _tiny("ddpmpp")
    blob = _rename_module(_snapshot_bytes(net, monkeypatch, tmp_path / "m"), "numpy._core.multiarray",
                          "numpy.core.multiarray")
    assert _globals(blob) == SNAPSHOT_GLOBALS - {"numpy._core.multiarray.scalar"} | {"numpy.core.multiarray.scalar"}
    loaded, _ = load_official_pickle(_write(tmp_path, blob))
    assert torch.equal(_outputs(loaded), _outputs(net))
    model = read_snapshot(_write(tmp_path, blob))["ema"].state["_modules"]["model"]
    block = model.state["_modules"]["enc"].state["_modules"]["16x16_block0"]
    assert type(block.state["skip_scale"]) is np.float64 and block.state["skip_scale"] == np.sqrt(0.5)


def test_non_persistent_buffers_are_skipped(tmp_path, monkeypatch):
    net = _tiny("ddpmpp")
    extra = {"_buffers": collections.OrderedDict(scratch=torch.zeros(2)), "_non_persistent_buffers_set": {"scratch"}}
    loaded, _ = load_official_pickle(_write(tmp_path, _snapshot_bytes(net, monkeypatch, tmp_path / "m", extra)))
    assert "scratch" not in loaded.state_dict()


def write_marker(path):
    """A 'payload' a hostile pickle may name; it must never run."""
    with open(path, "w") as f:
        f.write("pwned")


class Hostile:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make, name", [
    (lambda m: Hostile(os.system, f"touch {m}"), "posix.system"),
    (lambda m: Hostile(exec, f"open({str(m)!r}, 'w').write('x')"), "builtins.exec"),
    (lambda m: Hostile(write_marker, str(m)), ".write_marker"),
])
def test_hostile_pickles_are_refused_before_anything_runs(make, name, tmp_path):
    marker = tmp_path / "marker"
    path = _write(tmp_path, pickle.dumps({"ema": make(marker)}, protocol=4))
    with pytest.raises(UnsafePickleError, match=rf"refusing global '[\w.]*{name}'"):
        load_official_pickle(path)
    assert not marker.exists()


def test_unknown_global_inside_a_valid_file_is_named(tmp_path, monkeypatch):
    from fractions import Fraction
    net = _tiny("ddpmpp")
    blob = _snapshot_bytes(net, monkeypatch, tmp_path / "m", extra_state={"sigma_data": Fraction(1, 2)})
    with pytest.raises(UnsafePickleError, match="refusing global 'fractions.Fraction'"):
        load_official_pickle(_write(tmp_path, blob))


def test_layout_errors_are_one_line(tmp_path, monkeypatch):
    path = _write(tmp_path, pickle.dumps({"ema": 3}, protocol=4))
    with pytest.raises(OfficialFormatError, match="key 'ema' is not a persistent network"):
        load_official_pickle(path)
    net = _tiny("ddpmpp")
    blob = _snapshot_bytes(net, monkeypatch, tmp_path / "m", extra_state={"_init_kwargs": {
        **net.init_kwargs, "num_blocks": 2}})
    with pytest.raises(OfficialFormatError, match="weights do not match EDMPrecond"):
        load_official_pickle(_write(tmp_path, blob))
