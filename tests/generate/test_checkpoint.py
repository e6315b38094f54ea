"""raylab EDM checkpoints: round trip, integrity check, and `load_generator` dispatch."""
import dataclasses
import json
import os
import pickle

import pytest
import torch

from raylab.presets import make_config
from raylab.generate.checkpoint import CheckpointError, load_edm, load_generator, save_edm
from raylab.generate.networks import build_edm, edm_kwargs
from raylab.generate.official import UnsafePickleError



def _net(**overrides):
    cfg = dataclasses.replace(make_config("tiny").edm, model_channels=8, **overrides)
    return cfg, build_edm(cfg, img_resolution=16).eval()


def _out(net):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return net(x, torch.tensor(2.0), torch.eye(10)[[1, 2]] if net.label_dim else None)


@pytest.mark.parametrize("overrides", [dict(), dict(arch="ncsnpp", precond="vp", conditional=False)])
def test_round_trip_is_exact(tmp_path, overrides):
    cfg, net = _net(**overrides)
    with torch.no_grad():
        net.model.dec["16x16_aux_conv"].weight.add_(1.0)  # trained-looking weights, not the init
    save_edm(tmp_path / "ckpt", net, edm_kwargs(cfg, img_resolution=16), extra={"kimg": 12.5})
    loaded = load_edm(tmp_path / "ckpt")
    assert type(loaded) is type(net) and not loaded.training
    assert torch.equal(_out(loaded), _out(net))
    meta = json.loads((tmp_path / "ckpt" / "network.json").read_text())
    assert meta["class"] == type(net).__name__ and meta["extra"] == {"kimg": 12.5}
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["model.pt", "network.json"]  # no temp files left
    assert torch.equal(_out(load_generator(tmp_path / "ckpt")), _out(net))


def test_kwargs_default_to_the_networks_own(tmp_path):
    _, net = _net()
    save_edm(tmp_path, net)
    assert json.loads((tmp_path / "network.json").read_text())["kwargs"]["model_channels"] == 8


def test_tampered_or_incomplete_checkpoints_are_refused(tmp_path):
    _, net = _net()
    save_edm(tmp_path / "a", net)
    torch.save({"model.map_layer0.weight": torch.zeros(1)}, tmp_path / "a" / "model.pt")
    with pytest.raises(CheckpointError, match="does not match model_sha256"):
        load_edm(tmp_path / "a")
    (tmp_path / "b").mkdir()
    torch.save(net.state_dict(), tmp_path / "b" / "model.pt")  # weights without network.json: a partial write
    with pytest.raises(CheckpointError, match="no network.json"):
        load_edm(tmp_path / "b")
    with pytest.raises(CheckpointError, match="not a generator checkpoint"):
        load_generator(tmp_path / "b")


def test_pkl_paths_go_through_the_allowlist_loader(tmp_path):
    path = tmp_path / "edm-evil.pkl"
    # builtins.len: a global no library patches (Ray's tqdm support swaps in its own `print` once imported)
    path.write_bytes(pickle.dumps({"ema": len}, protocol=4))
    with pytest.raises(UnsafePickleError, match="builtins.len"):
        load_generator(path)
    with pytest.raises(CheckpointError, match="not a generator checkpoint"):
        load_generator(tmp_path / "missing.pkl")
