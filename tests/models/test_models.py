"""Classifier registry, architecture facts (RobustBench names, parameter counts, BN, init), forward/backward."""
import pytest
import torch
from torch import nn

from raylab.config import MODELS
from raylab.models import ModelError, create_model, list_models, load_reference_state_dict

CIFAR10 = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
SMALL = ("wrn-16-2", "resnet18")


def make(name="wrn-16-2", **kw):
    torch.manual_seed(0)
    return create_model(name, num_classes=kw.pop("num_classes", 10), **{**CIFAR10, **kw})


def test_registry_names_equal_config_choices():
    assert list_models() == sorted(MODELS)


# Exact counts for 10 classes, measured here; they agree with the reference's 0.69M / 36.48M / 266.80M
# (training_recipe.md §1) and the Sehwag et al. 2022 paper's 11.2M for ResNet-18.
PARAMS = {"wrn-10-1": 77_850, "wrn-10-2": 303_706, "wrn-16-2": 691_674, "wrn-28-10": 36_479_194, "wrn-34-10": 46_160_474, "wrn-34-20": 184_531_674,
          "wrn-70-16": 266_796_506, "resnet18": 11_173_962}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):  # construction only: no memory, no init cost for the 267M model
        model = create_model(name, num_classes=10, **CIFAR10)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_parameter_counts_match_the_papers():
    assert PARAMS["wrn-28-10"] / 1e6 == pytest.approx(36.48, abs=0.01)
    assert PARAMS["wrn-70-16"] / 1e6 == pytest.approx(266.80, abs=0.05)
    assert PARAMS["wrn-16-2"] / 1e6 == pytest.approx(0.69, abs=0.01)
    assert PARAMS["resnet18"] / 1e6 == pytest.approx(11.17, abs=0.01)


def _robustbench_keys(depth: int, width: int) -> set[str]:
    """State-dict keys of RobustBench `DMWideResNet` (robustbench/model_zoo/architectures/dm_wide_resnet.py,
    the version with `register_buffer('mean'|'std', ...view(3, 1, 1))`), written down from that file."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"mean", "std", "init_conv.weight", "logits.weight", "logits.bias"} | {f"batchnorm.{k}" for k in bn}
    widths = (16, 16 * width, 32 * width, 64 * width)
    for g in range(3):
        for b in range((depth - 4) // 6):
            p = f"layer.{g}.block.{b}."
            keys |= {p + "conv_0.weight", p + "conv_1.weight"}
            keys |= {f"{p}batchnorm_{i}.{k}" for i in (0, 1) for k in bn}
            if b == 0 and widths[g] != widths[g + 1]:  # `has_shortcut = in_planes != out_planes`
                keys.add(p + "shortcut.weight")
    return keys


def test_state_dict_matches_robustbench_dmwideresnet():
    sd = make("wrn-16-2").state_dict()
    assert set(sd) == _robustbench_keys(16, 2) and len(sd) == 85
    assert list(sd)[:3] == ["mean", "std", "init_conv.weight"]
    shapes = {"mean": (3, 1, 1), "std": (3, 1, 1), "init_conv.weight": (16, 3, 3, 3),
              "layer.0.block.0.batchnorm_0.weight": (16,), "layer.0.block.0.conv_0.weight": (32, 16, 3, 3),
              "layer.0.block.0.shortcut.weight": (32, 16, 1, 1), "layer.1.block.0.shortcut.weight": (64, 32, 1, 1),
              "layer.2.block.1.conv_1.weight": (128, 128, 3, 3), "batchnorm.running_var": (128,),
              "logits.weight": (10, 128), "logits.bias": (10,)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert "layer.0.block.1.shortcut.weight" not in sd  # identity shortcut when widths agree
    assert torch.allclose(sd["mean"].flatten(), torch.tensor(CIFAR10["mean"]))


def test_big_wrn_keys_on_meta():
    with torch.device("meta"):
        sd = create_model("wrn-70-16", num_classes=10, **CIFAR10).state_dict()
    assert set(sd) == _robustbench_keys(70, 16)
    assert "layer.2.block.10.batchnorm_1.running_mean" in sd and "layer.2.block.11.conv_0.weight" not in sd


def test_reference_checkpoint_loads_strictly():
    """DM-Improves-AT saves `DataParallel(Sequential(model))` keys without mean/std (training_recipe.md §1)."""
    src, dst = make(), create_model("wrn-16-2", num_classes=10, **CIFAR10)
    reference = {f"module.0.{k}": v for k, v in src.state_dict().items() if k not in ("mean", "std")}
    load_reference_state_dict(dst, reference)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_reference_state_dict(dst, {k: v for k, v in reference.items() if "logits" not in k})


@pytest.mark.parametrize("activation, cls", [("silu", nn.SiLU), ("relu", nn.ReLU)])
def test_batchnorm_activation_and_names(activation, cls):
    model = make(activation=activation)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 13 and all(b.momentum == 0.01 and b.eps == 1e-5 for b in bns)
    block = model.layer[1].block[0]
    assert isinstance(block.relu_0, cls) and isinstance(block.relu_1, cls) and isinstance(model.relu, cls)
    assert block.conv_0.padding == (0, 0) and block.conv_0.stride == (2, 2) and block.conv_1.padding == (1, 1)
    assert "mean" in dict(model.named_buffers()) and "mean" not in dict(model.named_parameters())


def test_init_follows_the_reference():
    model = make()
    conv = model.layer[2].block[1].conv_1  # 128*128*9 weights: std estimated to ~0.2%
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 128)) ** 0.5, rel=0.01)
    assert abs(conv.weight.mean().item()) < 1e-3
    assert torch.equal(model.batchnorm.weight, torch.ones(128)) and torch.equal(model.batchnorm.bias, torch.zeros(128))
    assert torch.equal(model.logits.bias, torch.zeros(10))


@pytest.mark.parametrize("stride, pad", [(1, (1, 1, 1, 1)), (2, (0, 1, 0, 1))])
def test_conv0_pads_like_tensorflow_same(stride, pad):
    """conv_0 computes the unpadded conv of its input padded TF-'SAME': (1,1,1,1) at stride 1 (done by the conv
    itself), bottom/right only, (0,1,0,1), at stride 2."""
    import torch.nn.functional as F

    model = make().eval()
    block = model.layer[0].block[0] if stride == 1 else model.layer[1].block[0]
    seen = {}
    block.relu_0.register_forward_hook(lambda m, args, out: seen.setdefault("act", out.detach().clone()))
    block.conv_0.register_forward_hook(lambda m, args, out: seen.setdefault("out", out.detach().clone()))
    model(torch.rand(2, 3, 32, 32))
    expected = F.conv2d(F.pad(seen["act"], pad), block.conv_0.weight, stride=stride)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
    assert seen["out"].shape[-1] == 32 // stride


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_and_channels_last(name):
    model = make(name)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x)
        cl = model(x.contiguous(memory_format=torch.channels_last))
        model_cl = model.to(memory_format=torch.channels_last)
        both = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(cl, ref, atol=1e-4) and torch.allclose(both, ref, atol=1e-4)


def test_normalization_is_inside_the_model():
    model = make().eval()
    plain = create_model("wrn-16-2", num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3).eval()
    plain.load_state_dict({**model.state_dict(), "mean": plain.mean, "std": plain.std})
    x = torch.rand(2, 3, 32, 32)
    normalized = (x - torch.tensor(CIFAR10["mean"]).view(3, 1, 1)) / torch.tensor(CIFAR10["std"]).view(3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(normalized), atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="wrn-99-1"), "model.name: 'wrn-99-1' is not one of resnet18, wrn-10-1, wrn-10-2, wrn-16-2"),
    (dict(activation="gelu"), "model.activation: 'gelu' is not one of silu, relu"),
    (dict(num_classes=0), "num_classes: 0 must be an int >= 1"),
    (dict(mean=(0.5, 0.5)), "mean: (0.5, 0.5) must be 3 finite floats"),
    (dict(std=(0.5, 0.0, 0.5)), "std: (0.5, 0.0, 0.5) must be 3 finite positive floats"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    args = {"name": "wrn-16-2", "num_classes": 10, **CIFAR10, **kwargs}
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_model(args.pop("name"), **args)


@pytest.mark.parametrize("name", SMALL)
def test_wrong_input_size_is_rejected(name):
    with pytest.raises(ModelError, match=r"must be \(N, 3, 32, 32\)"):
        make(name)(torch.rand(1, 3, 64, 64))
