"""Sample-quality metrics and the stationarity test."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg, optimize
from torch import Tensor, nn

from ._models import seeded_init
from ._sampling import _prepare, as_generator, langevin_step


def _flat(x) -> Tensor:
    return torch.as_tensor(x).detach().cpu().double().flatten(1)


def sliced_wasserstein(x, y, *, n_projections: int = 256, p: int = 2, random_state: int | None = 0) -> float:
    """Sliced p-Wasserstein distance ``(mean_theta W_p^p(<x, theta>, <y, theta>))^(1/p)``.

    Projections are uniform random directions; sets of different sizes are compared through their quantile
    functions on a common grid.
    """
    x, y = _flat(x), _flat(y)
    gen = torch.Generator().manual_seed(int(np.random.default_rng(random_state).integers(2**62)))
    theta = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    if px.shape[0] != py.shape[0]:
        m = max(px.shape[0], py.shape[0])
        levels = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        px, py = torch.quantile(px, levels, dim=0), torch.quantile(py, levels, dim=0)
    return float((px - py).abs().pow(p).mean() ** (1 / p))


def mmd(x, y, *, scales: tuple[float, ...] = (0.5, 1.0, 2.0), bandwidth: float | None = None) -> float:
    """Maximum mean discrepancy with a sum of Gaussian kernels (biased V-statistic, so 0 for identical sets).

    The base bandwidth is the median pairwise distance within ``y`` (the reference set) unless given; kernels
    use ``scales`` times it.

    Returns
    -------
    ``sqrt(MMD^2)``.
    """
    x, y = _flat(x), _flat(y)
    if bandwidth is None:
        d = torch.cdist(y, y)
        bandwidth = float(d[d > 0].median()) if (d > 0).any() else 1.0

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * (s * bandwidth) ** 2)) for s in scales)

    val = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    return float(val.clamp_min(0).sqrt())


def wasserstein(x, y, *, random_state: int | None = 0) -> float:
    """Exact 2-Wasserstein distance between two empirical sets (flattened), by optimal assignment.

    Sets of different sizes are subsampled to the smaller size.
    """
    x, y = _flat(x), _flat(y)
    n = min(len(x), len(y))
    rng = np.random.default_rng(random_state)
    if len(x) > n:
        x = x[torch.as_tensor(rng.choice(len(x), n, replace=False))]
    if len(y) > n:
        y = y[torch.as_tensor(rng.choice(len(y), n, replace=False))]
    cost = torch.cdist(x, y).square().numpy()
    rows, cols = optimize.linear_sum_assignment(cost)
    return float(math.sqrt(cost[rows, cols].mean()))


class DigitClassifier(nn.Module):
    """A small MLP classifier of 8x8 digits; its penultimate layer is the feature space."""

    def __init__(self, n_features: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, n_features), nn.SiLU())
        self.head = nn.Linear(n_features, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(torch.as_tensor(x, dtype=torch.float32).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digit_classifier(
    x: Tensor, labels: Tensor, *, n_steps: int = 400, random_state: int = 0
) -> DigitClassifier:
    """Fit :class:`DigitClassifier` on digits in ``[-1, 1]`` (``[N, 1, 8, 8]``), full batch, Adam.

    Small input noise (std 0.1) keeps it from relying on exact pixel values.
    """
    gen = torch.Generator().manual_seed(random_state)
    clf = seeded_init(DigitClassifier(), gen)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    x = x.flatten(1).float()
    for _ in range(n_steps):
        xn = x + 0.1 * torch.randn(x.shape, generator=gen)
        loss = nn.functional.cross_entropy(clf(xn), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def classifier_frechet_distance(x, y, classifier: DigitClassifier) -> float:
    """Frechet distance between Gaussians fitted to classifier features of two image sets.

    ``|m_x - m_y|^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2))`` in the feature space of a small digit classifier (the
    construction of FID, with this classifier in place of Inception).
    """
    fx = classifier.features(torch.as_tensor(x)).double().numpy()
    fy = classifier.features(torch.as_tensor(y)).double().numpy()
    mx, my = fx.mean(0), fy.mean(0)
    cx, cy = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    root = linalg.sqrtm(cx @ cy)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mx - my) ** 2).sum() + np.trace(cx + cy - 2 * root))


@torch.no_grad()
def recognisability(x, classifier: DigitClassifier) -> dict[str, float]:
    """How confidently the classifier reads generated digits.

    Returns
    -------
    A dict with ``'confident_fraction'`` (share of samples whose top class probability exceeds 0.9),
    ``'mean_confidence'`` (mean top class probability) and ``'class_entropy'`` (entropy in nats of the
    predicted-class histogram; log 10 = 2.30 when all ten classes are equally frequent).
    """
    p = classifier(torch.as_tensor(x)).softmax(-1)
    conf = p.max(-1).values
    hist = torch.bincount(p.argmax(-1), minlength=10).double()
    hist /= hist.sum()
    ent = -(hist[hist > 0] * hist[hist > 0].log()).sum()
    return {
        "confident_fraction": float((conf > 0.9).double().mean()),
        "mean_confidence": float(conf.mean()),
        "class_entropy": float(ent),
    }


@torch.no_grad()
def stationarity_test(
    model,
    data: Tensor,
    *,
    sigma: float,
    total_time: float = 40.0,
    step_size: float = 0.05,
    n_checkpoints: int = 10,
    noise_std: float = 3.0,
    n_projections: int = 128,
    random_state: int | torch.Generator | None = 0,
    device: str | torch.device = "auto",
) -> dict[str, list[float] | float]:
    """Run the learned dynamics for a long time from the data law and from noise; track the distance to the law.

    ``data`` (held out) is split in halves: chains start at ``A + sigma eps`` and ``N(0, noise_std^2)``; the
    reference is ``B + sigma eps'``, a draw from ``p_sigma``. Distances are sliced Wasserstein.

    Returns
    -------
    ``{'times', 'from_data', 'from_noise'}`` (lists over checkpoints, time 0 included) and ``'floor'``, the
    distance between two independent draws of the law (the sampling noise of the metric).
    """
    device = _prepare(model, device)
    gen = as_generator(random_state, device)
    data = data.to(device)
    half = data.shape[0] // 2
    noise = lambda like: torch.randn(like.shape, generator=gen, device=device, dtype=like.dtype)  # noqa: E731
    ref = data[half : 2 * half] + sigma * noise(data[half : 2 * half])
    z_data = data[:half] + sigma * noise(data[:half])
    z_noise = noise_std * noise(data[:half])
    floor = sliced_wasserstein(z_data, ref, n_projections=n_projections)
    n_steps = max(1, round(total_time / step_size))
    marks = set(np.linspace(0, n_steps, n_checkpoints + 1).round().astype(int).tolist())
    out = {"times": [], "from_data": [], "from_noise": []}
    for k in range(n_steps + 1):
        if k in marks:
            out["times"].append(k * step_size)
            out["from_data"].append(sliced_wasserstein(z_data, ref, n_projections=n_projections))
            out["from_noise"].append(sliced_wasserstein(z_noise, ref, n_projections=n_projections))
        if k < n_steps:
            z_data = langevin_step(model, z_data, sigma, step_size, gen)
            z_noise = langevin_step(model, z_noise, sigma, step_size, gen)
    out["floor"] = floor
    return out
