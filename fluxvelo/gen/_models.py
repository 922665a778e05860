"""Fields for the generative trainer: ``model(x, sigma) -> f`` with ``f`` shaped like ``x``.

Every model predicts a score-like field at noise level ``sigma`` as ``raw / sigma``, with inputs scaled by
``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` so that the network sees unit-scale inputs and outputs at every level.
Activations are smooth (SiLU/GELU): Flux Matching differentiates the field twice in its input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sigma_vector(sigma: float | Tensor, x: Tensor) -> Tensor:
    """``sigma`` as a tensor ``[N]`` matching the batch of ``x`` (a float or a 0-d tensor is broadcast)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.reshape(-1).expand(x.shape[0]) if s.numel() == 1 else s.reshape(-1)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class SigmaEmbedding(nn.Module):
    """Fourier features of ``log sigma`` followed by a small MLP, ``[N] -> [N, dim]``."""

    def __init__(self, dim: int = 64, n_freq: int = 16, max_freq: float = 8.0):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-1, math.log10(max_freq), n_freq) * math.pi, persistent=False)
        self.net = nn.Sequential(nn.Linear(2 * n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma: Tensor) -> Tensor:
        a = torch.log(sigma.clamp_min(1e-12)).unsqueeze(-1) * self.freqs.to(sigma.dtype) / 4
        return self.net(torch.cat([torch.sin(a), torch.cos(a)], -1))


class MLPField(nn.Module):
    """An unrestricted field on ``R^dim`` conditioned on sigma (low-dimensional data).

    Parameters
    ----------
    dim
        Data dimension.
    hidden, depth
        Width and number of hidden layers.
    sigma_data
        Typical scale of the data, for the input scaling ``c_in``.
    """

    def __init__(self, dim: int, *, hidden: int = 128, depth: int = 3, sigma_data: float = 1.0):
        super().__init__()
        self.dim, self.sigma_data = dim, sigma_data
        self.embed = SigmaEmbedding(hidden)
        self.inp = nn.Linear(dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def raw(self, x: Tensor, sigma: Tensor) -> Tensor:
        c_in = 1.0 / torch.sqrt(sigma**2 + self.sigma_data**2)
        h = torch.nn.functional.silu(self.inp(c_in[:, None] * x) + self.embed(sigma))
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h))
        return self.out(h)

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        s = sigma_vector(sigma, x)
        return self.raw(x, s) / s[:, None]


def antisymmetric_pairs(dim: int) -> Tensor:
    """A fixed antisymmetric matrix that rotates coordinate pairs ``(0, 1), (2, 3), ...`` by 90 degrees."""
    a = torch.zeros(dim, dim)
    for i in range(0, dim - 1, 2):
        a[i + 1, i], a[i, i + 1] = 1.0, -1.0
    return a


class RotationalField(nn.Module):
    """A structured, non-conservative field: ``f = (I + omega A) grad log q_theta`` with A antisymmetric.

    ``q_theta`` is an unnormalised density given by a potential network. If ``q_theta`` equals the data law p,
    the extra part ``omega A grad log p`` carries no net flux (``div(p A grad log p) = 0`` for antisymmetric
    A), so the field keeps p stationary while circulating around its level sets. Flux Matching can therefore
    learn it exactly; denoising score matching cannot, because ``(I + omega A)`` times a gradient is never the
    score unless omega = 0.

    Parameters
    ----------
    dim
        Data dimension.
    omega
        Imposed rotation strength (fixed, not learned).
    hidden, depth, sigma_data
        As in :class:`MLPField`, for the potential network.
    """

    def __init__(self, dim: int, *, omega: float = 2.0, hidden: int = 128, depth: int = 3, sigma_data: float = 1.0):
        super().__init__()
        self.omega = omega
        self.potential = MLPField(dim, hidden=hidden, depth=depth, sigma_data=sigma_data)
        self.potential.out = nn.Linear(hidden, 1)
        self.register_buffer("rotation", antisymmetric_pairs(dim))

    def gradient_part(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The conservative part ``grad log q_theta``."""
        s = sigma_vector(sigma, x)
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            xx = x if x.requires_grad else x.detach().requires_grad_(True)
            c_in = 1.0 / torch.sqrt(s**2 + self.potential.sigma_data**2)
            v = self.potential.raw(xx, s).squeeze(-1)
            (g,) = torch.autograd.grad(v.sum(), xx, create_graph=outer)
        # v(c_in x) / (sigma c_in^2) has gradient g / (sigma c_in); a per-sample constant keeps it conservative
        return g / (s * c_in)[:, None]

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        g = self.gradient_part(x, sigma)
        return g + self.omega * g @ self.rotation.T


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(groups, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetField(nn.Module):
    """A small U-Net over images ``[N, C, H, W]`` conditioned on sigma (H and W divisible by 2**(levels-1)).

    Parameters
    ----------
    channels
        Image channels.
    width
        Channels at full resolution; each coarser level doubles them.
    levels
        Number of resolutions.
    sigma_data
        Typical pixel scale, for the input scaling.
    """

    def __init__(self, channels: int = 1, *, width: int = 32, levels: int = 2, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        emb = 4 * width
        self.embed = SigmaEmbedding(emb)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        c = width
        for w in widths:
            self.down.append(_ResBlock(c, w, emb))
            c = w
        self.mid = _ResBlock(c, c, emb)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(_ResBlock(c + w, w, emb))
            c = w
        self.out = nn.Sequential(nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        s = sigma_vector(sigma, x)
        e = self.embed(s)
        h = self.inp(_bcast(1.0 / torch.sqrt(s**2 + self.sigma_data**2), x) * x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < len(self.down) - 1:
                h = nn.functional.avg_pool2d(h, 2)
        h = self.mid(h, e)
        for i, block in enumerate(self.up):
            if i:
                h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], 1), e)
        return self.out(h) / _bcast(s, x)


class _AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention and MLP. Attention is written out so it is twice differentiable."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if mask is not None:
            att = att.masked_fill(mask, float("-inf"))
        h = h + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d))
        return h + self.mlp(self.norm2(h))


class TrajectoryTransformer(nn.Module):
    """A transformer over the time steps of trajectories ``[N, T, d]``, conditioned on sigma.

    With ``causal=True`` the field at step t sees only steps ``<= t``: an autoregressive structure that a
    score generally does not have (the score at t depends on the future), but a stationary field can.

    Parameters
    ----------
    seq_len, dim
        Trajectory length T and state dimension d.
    hidden, depth, heads, mlp_ratio
        Transformer width, number of blocks, attention heads and the MLP's width factor.
    causal
        Mask attention to the past.
    sigma_data
        Typical scale of the (standardised) states.
    """

    def __init__(
        self,
        seq_len: int,
        dim: int,
        *,
        hidden: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        causal: bool = False,
        sigma_data: float = 1.0,
    ):
        super().__init__()
        self.causal, self.sigma_data = causal, sigma_data
        self.inp = nn.Linear(dim, hidden)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, hidden))
        self.embed = SigmaEmbedding(hidden)
        self.blocks = nn.ModuleList(_AttentionBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1) if causal else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        s = sigma_vector(sigma, x)
        c_in = 1.0 / torch.sqrt(s**2 + self.sigma_data**2)
        h = self.inp(_bcast(c_in, x) * x) + self.pos[: x.shape[1]] + self.embed(s)[:, None]
        for block in self.blocks:
            h = block(h, self.mask)
        return self.out(h) / _bcast(s, x)


@torch.no_grad()
def seeded_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw the weights of every linear and convolution layer from ``generator`` (PyTorch's default uniform
    bounds ``1/sqrt(fan_in)``), and free parameters from ``N(0, 0.02^2)``; layers initialised to zero stay zero.
    No global random state is used."""
    own = set()
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            own.update({id(m.weight), id(m.bias) if m.bias is not None else None})
            if not bool(m.weight.any()):
                continue
            bound = 1.0 / math.sqrt(m.weight[0].numel())
            m.weight.uniform_(-bound, bound, generator=generator)
            if m.bias is not None:
                m.bias.uniform_(-bound, bound, generator=generator)
    for name, p in module.named_parameters():
        if id(p) not in own and p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=generator)
    return module


MODELS = {"mlp": MLPField, "rotational": RotationalField, "unet": UNetField, "transformer": TrajectoryTransformer}


def build_model(kind: str, shape: tuple[int, ...], **options) -> nn.Module:
    """A model by name for data of per-sample shape ``shape``.

    ``'mlp'`` and ``'rotational'`` take ``(dim,)``, ``'unet'`` ``(C, H, W)``, ``'transformer'`` ``(T, d)``;
    ``options`` go to the constructor.
    """
    if kind in {"mlp", "rotational"}:
        return MODELS[kind](int(math.prod(shape)), **options)
    if kind == "unet":
        return UNetField(shape[0], **options)
    if kind == "transformer":
        return TrajectoryTransformer(shape[0], shape[1], **options)
    raise ValueError(f"Unknown model {kind!r}; use one of {sorted(MODELS)}.")
