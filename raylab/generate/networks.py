"""EDM denoisers: the SongUNet backbone (DDPM++ / NCSN++) and the EDM, VP and VE preconditionings.

Written from Karras et al. 2022 (EDM, Table 1 and App. F) and the facts in `reference/edm.md` §2–§3; no NVlabs
code is copied. What *is* reproduced on purpose is the official parameter layout: module names
(`model.enc.32x32_conv`, `model.dec.16x16_block4.qkv`, ...), tensor shapes, persistent buffers
(`resample_filter`, `freqs`) and the constructor keyword names of the official `_init_kwargs`, so that an official
snapshot rebuilt from its own kwargs loads into these classes with `strict=True` (`raylab.generate.official`).

Precond call: ``net(x, sigma, class_labels=None, augment_labels=None) -> D(x; sigma)`` with x of shape
[B, C, H, W], sigma a scalar or [B] tensor, class_labels one-hot float [B, label_dim].
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from raylab.config import EDMConfig


class NetworkConfigError(ValueError):
    """A one-line message naming the bad network argument and what is allowed."""


def _choice(what: str, value: str, allowed) -> str:
    if value not in allowed:
        raise NetworkConfigError(f"{what}: {value!r} is not one of {', '.join(allowed)}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Layers. Every layer casts its weights to the input dtype so the fp16 path (use_fp16 on CUDA) works unchanged.

def _xavier_uniform(shape: Sequence[int], fan_in: int, fan_out: int, gain: float) -> torch.Tensor:
    """Glorot & Bengio 2010 uniform init scaled by `gain` (EDM inits weights this way, zero biases)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(*shape) * 2 - 1) * (bound * gain)


class Linear(nn.Module):
    """y = x Wᵀ + b with W of shape [out, in] (the state-dict layout of nn.Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(_xavier_uniform([out_features, in_features], in_features, out_features,
                                                   init_weight))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One [1, in] × [in, out] product per row (bmm), not one GEMM over the batch: BLAS picks GEMM kernels by
        # batch size, which changes the low bits of each row and would make sampled bytes depend on the batch
        # size. These layers are ~0.02% of the network's FLOPs (edm.md §5), so the cost is nil.
        y = torch.bmm(x.unsqueeze(1), self.weight.to(x.dtype).t().expand(x.shape[0], -1, -1)).squeeze(1)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


def _resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable FIR filter outer(f, f) / sum(f)², shaped [1, 1, k, k] (edm.md §2: [1,1] → all 0.25)."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


def _upsample(x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
    """Depthwise stride-2 transposed conv with 4f (4 = the stride² gain that keeps the mean)."""
    c = x.shape[1]
    return F.conv_transpose2d(x, f.mul(4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=padding)


def _downsample(x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
    c = x.shape[1]
    return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=padding)


class Conv2d(nn.Module):
    """k×k conv (k = 0: resample only) with optional FIR up/down-sampling applied before it.

    `fused_resample` (used by the NCSN++ residual encoder) convolves first and downsamples after, as one
    padded pass; the result has the same size as the unfused order.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_weight: float = 1.0):
        if up and down:
            raise NetworkConfigError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (nn.Parameter(_xavier_uniform([out_channels, in_channels, kernel, kernel], fan_in, fan_out,
                                                    init_weight)) if kernel else None)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv2d(_upsample(x, f, max(f_pad - w_pad, 0)), w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = _downsample(F.conv2d(x, w, padding=w_pad + f_pad), f, 0)
        else:
            x = _upsample(x, f, f_pad) if self.up else _downsample(x, f, f_pad) if self.down else x
            x = F.conv2d(x, w, padding=w_pad) if w is not None else x
        return x + self.bias.to(x.dtype).reshape(1, -1, 1, 1) if self.bias is not None else x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C/4) groups (so narrow test networks still normalize over ≥ 4 channels)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, max_groups: int = 32, min_channels_per_group: int = 4):
        super().__init__()
        self.num_groups = min(max_groups, max(num_channels // min_channels_per_group, 1))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# ---------------------------------------------------------------------------------------------------------------
# Noise-level embeddings (no parameters; Fourier keeps its random frequencies as a persistent buffer).

class PositionalEmbedding(nn.Module):
    """Transformer sinusoids [cos(c·f), sin(c·f)], f_i = max_positions^(-i/(n/2 - endpoint)) (DDPM++)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2πc·f), sin(2πc·f)], f ~ N(0, scale²) (NCSN++, Song et al. 2021)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


EMBEDDINGS: dict[str, Callable[[int], nn.Module]] = {
    "positional": lambda n: PositionalEmbedding(n, endpoint=True),
    "fourier": lambda n: FourierEmbedding(n),
}


# ---------------------------------------------------------------------------------------------------------------
# The residual block (edm.md §2 "UNetBlock"), optionally with one single-head self-attention layer.

class UNetBlock(nn.Module):
    """GN-SiLU-conv, + affine(emb), GN-SiLU-dropout-conv, + skip, ·√½; then optional attention, ·√½."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0, eps: float = 1e-6,
                 resample_filter: Sequence[float] = (1, 1), skip_scale: float = math.sqrt(0.5)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.skip_scale, self.attention = dropout, skip_scale, attention
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        # Zero-ish init of the residual branch's last conv: each block starts close to its skip path.
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init_weight=1e-5)
        needs_skip = out_channels != in_channels or up or down
        self.skip = Conv2d(in_channels, out_channels, kernel=1, **resample) if needs_skip else None
        if attention:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init_weight=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        return self._attend(h) if self.attention else h

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # The qkv channels are interleaved (channel 3i+j is part j of feature i): the official weight layout.
        q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, height * width).unbind(2)
        # Softmax in fp32 even under fp16 (as EDM does): the logits over 256 positions overflow half precision.
        logits = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c))
        w = logits.softmax(dim=2).to(v.dtype)
        a = torch.einsum("nqk,nck->ncq", w, v)
        return (self.proj(a.reshape(b, c, height, width)) + x) * self.skip_scale


# ---------------------------------------------------------------------------------------------------------------
# SongUNet (Song et al. 2021 DDPM++ / NCSN++ as configured in EDM; edm.md §2 "Layout").

def _aux_none(enc: nn.ModuleDict, res: int, caux: int, cout: int, taps: Sequence[float]) -> int:
    return caux


def _aux_skip(enc: nn.ModuleDict, res: int, caux: int, cout: int, taps: Sequence[float]) -> int:
    """Progressive-input 'skip': the image is FIR-downsampled and projected into each level."""
    enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=taps)
    enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1)
    return caux


def _aux_residual(enc: nn.ModuleDict, res: int, caux: int, cout: int, taps: Sequence[float]) -> int:
    """Progressive-input 'residual' (NCSN++): a strided 3×3 conv of the previous level's features."""
    enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=taps,
                                              fused_resample=True)
    return cout


ENCODER_AUX: dict[str, Callable[..., int]] = {"standard": _aux_none, "skip": _aux_skip, "residual": _aux_residual}
DECODER_TYPES = ("standard", "skip")


class SongUNet(nn.Module):
    """U-Net of DDPM++ (positional embedding, standard encoder, [1,1] filter) and NCSN++ (Fourier embedding,
    residual encoder, [1,3,3,1] filter). Defaults are the official constructor's, so `_init_kwargs` that omit
    `num_blocks`, `attn_resolutions` or `channel_mult_emb` rebuild the same network."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        _choice("SongUNet embedding_type", embedding_type, EMBEDDINGS)
        _choice("SongUNet encoder_type", encoder_type, ENCODER_AUX)
        _choice("SongUNet decoder_type", decoder_type, DECODER_TYPES)
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise NetworkConfigError(f"SongUNet img_resolution: {img_resolution} is not divisible by "
                                     f"2^{len(channel_mult) - 1} (one halving per channel_mult level)")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        self.map_noise = EMBEDDINGS[embedding_type](noise_channels)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=list(resample_filter))
        self.enc = self._build_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                       attn_resolutions, encoder_type, block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        self.dec = self._build_decoder(img_resolution, out_channels, model_channels, channel_mult, num_blocks,
                                       attn_resolutions, decoder_type, block, skips)

    @staticmethod
    def _build_encoder(res0, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                       encoder_type, block) -> nn.ModuleDict:
        enc, cout, caux = nn.ModuleDict(), in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = res0 >> level
            if level == 0:
                enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3)
                cout = model_channels
            else:
                enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                caux = ENCODER_AUX[encoder_type](enc, res, caux, cout, block["resample_filter"])
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        return enc

    @staticmethod
    def _build_decoder(res0, out_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                       decoder_type, block, skips) -> nn.ModuleDict:
        dec, cout, last = nn.ModuleDict(), skips[-1], len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = res0 >> level
            if level == last:  # bottleneck: one attention block and one plain block at the lowest resolution
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):  # one more block than the encoder: it also consumes the down skip
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                        resample_filter=block["resample_filter"])
                dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, init_weight=1e-5)
        return dec

    def _embed(self, noise_labels: torch.Tensor, class_labels, augment_labels) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] → [sin, cos]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips, aux = [], x
        for name, block in self.enc.items():
            role = name.partition("_")[2]
            if role == "aux_down":
                aux = block(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + block(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return x, skips

    def _decode(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        aux = tmp = None
        for name, block in self.dec.items():
            role = name.partition("_")[2]
            if role == "aux_up":
                aux = block(aux)
            elif role == "aux_norm":
                tmp = block(x)
            elif role == "aux_conv":
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:  # this block consumes the next encoder skip
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self._embed(noise_labels, class_labels, augment_labels)
        x, skips = self._encode(x, emb)
        return self._decode(x, emb, skips)


MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet}


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise)  (EDM Table 1; edm.md §2 table).

class _Precond(nn.Module):
    """Shared forward of every preconditioning; subclasses give `coefficients(σ)` and their σ range."""

    sigma_min: float
    sigma_max: float

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 model_kwargs: dict[str, Any], own_kwargs: dict[str, Any]):
        _choice(f"{type(self).__name__} model_type", model_type, MODEL_TYPES)
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16 = label_dim, use_fp16
        # The full constructor call, so checkpoints can rebuild the network (the official `_init_kwargs`).
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, **own_kwargs, model_type=model_type, **model_kwargs)
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for σ of shape [B, 1, 1, 1]."""
        raise NotImplementedError

    def round_sigma(self, sigma) -> torch.Tensor:
        """Identity: only iDDPM's discrete σ table rounds (edm.md §1)."""
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, force_fp32: bool = False) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1) if sigma.shape[0] == 1 else sigma
        labels = None
        if self.label_dim:
            labels = (torch.zeros([x.shape[0], self.label_dim], device=x.device) if class_labels is None
                      else class_labels.to(torch.float32).reshape(-1, self.label_dim))
        half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if half else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels, augment_labels=augment_labels)
        return c_skip * x + c_out * f_x.to(torch.float32)


class EDMPrecond(_Precond):
    """EDM (Karras et al. 2022 §5): unit-variance input and target at every σ; c_noise = ¼ ln σ."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, sigma_data: float = 0.5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data))
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        total = sigma ** 2 + self.sigma_data ** 2
        return (self.sigma_data ** 2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt(),
                sigma.log() / 4)


class VPPrecond(_Precond):
    """Variance preserving (Song et al. 2021): σ(t) = √(exp(½β_d t² + β_min t) − 1), c_noise = (M−1)·t(σ)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t))
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        # In float32 like the reference, so σ_min is its 0.000977 (float64 would give 0.001000): the sampler clamps
        # its schedule to this range and must clamp to the same value.
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float32, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float32, device="cpu")))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return (torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma))


class VEPrecond(_Precond):
    """Variance exploding (Song et al. 2021): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100.0, model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         dict(sigma_min=sigma_min, sigma_max=sigma_max))
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


PRECONDS: dict[str, type[_Precond]] = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}


def make_network(class_name: str, kwargs: dict[str, Any]) -> _Precond:
    """Rebuild a preconditioned network from its class name and constructor kwargs (checkpoint loaders)."""
    _choice("network class", class_name, PRECONDS)
    try:
        return PRECONDS[class_name](**kwargs)
    except TypeError as err:  # an unknown or missing constructor keyword
        raise NetworkConfigError(f"{class_name} kwargs: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# raylab config → official constructor kwargs (edm.md §2 "CIFAR-10 configs", from EDM's train.py).

ARCHS: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1]),
    "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
}
PRECOND_NAMES = {"edm": "EDMPrecond", "vp": "VPPrecond", "ve": "VEPrecond"}


def edm_kwargs(cfg: EDMConfig, img_resolution: int = 32, label_dim: int = 10, img_channels: int = 3) -> dict:
    """Constructor kwargs (official names) of the network `cfg` describes; label_dim = 0 if unconditional."""
    kwargs = dict(img_resolution=img_resolution, img_channels=img_channels,
                  label_dim=label_dim if cfg.conditional else 0, use_fp16=False, model_type="SongUNet",
                  **ARCHS[cfg.arch], model_channels=cfg.model_channels, channel_mult=list(cfg.channel_mult),
                  num_blocks=cfg.num_blocks, attn_resolutions=list(cfg.attn_resolutions),
                  augment_dim=cfg.augment_dim, dropout=cfg.dropout)
    if cfg.precond == "edm":
        kwargs["sigma_data"] = cfg.sigma_data
    return kwargs


def build_edm(cfg: EDMConfig, img_resolution: int = 32, label_dim: int = 10, img_channels: int = 3) -> nn.Module:
    """The preconditioned network of `cfg`, initialised from `cfg.seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return make_network(PRECOND_NAMES[cfg.precond], edm_kwargs(cfg, img_resolution, label_dim, img_channels))
