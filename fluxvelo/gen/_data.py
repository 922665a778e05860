"""Data for the generative trainer: 2-D toys, coupled-spring trajectories, digits and image folders."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

TOYS = ("triangle", "ring", "moons", "spirals")
IMAGES = ("mnist", "cifar10", "celeba")


def _rng(random_state: int | np.random.Generator | None) -> np.random.Generator:
    return random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(random_state)


def triangle_centers(radius: float = 2.3) -> np.ndarray:
    """The three component means of the paper's triangle mixture, ``[3, 2]``."""
    angles = np.array([np.pi / 2, 7 * np.pi / 6, 11 * np.pi / 6])
    return radius * np.stack([np.cos(angles), np.sin(angles)], 1)


def triangle_mixture(n: int, *, radius: float = 2.3, std: float = 0.65, random_state=0) -> Tensor:
    """The paper's 2-D mixture: three equal Gaussians of std ``std`` on a triangle of radius ``radius``.

    Returns
    -------
    Points ``[n, 2]`` (float32).
    """
    rng = _rng(random_state)
    idx = rng.integers(0, 3, n)
    x = triangle_centers(radius)[idx] + std * rng.standard_normal((n, 2))
    return torch.as_tensor(x, dtype=torch.float32)


def ring(n: int, *, radius: float = 2.0, std: float = 0.15, random_state=0) -> Tensor:
    """Points on a circle of radius ``radius`` with radial Gaussian noise, ``[n, 2]``."""
    rng = _rng(random_state)
    theta = rng.uniform(0, 2 * np.pi, n)
    r = radius + std * rng.standard_normal(n)
    return torch.as_tensor(np.stack([r * np.cos(theta), r * np.sin(theta)], 1), dtype=torch.float32)


def moons(n: int, *, noise: float = 0.08, random_state=0) -> Tensor:
    """Two interleaving half circles (as scikit-learn's ``make_moons``), centred and scaled to unit spread."""
    rng = _rng(random_state)
    upper = rng.random(n) < 0.5
    theta = rng.uniform(0, np.pi, n)
    x = np.where(upper, np.cos(theta), 1 - np.cos(theta))
    y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
    pts = np.stack([x - 0.5, y - 0.25], 1) * 2.0 + noise * 2.0 * rng.standard_normal((n, 2))
    return torch.as_tensor(pts, dtype=torch.float32)


def spirals(n: int, *, turns: float = 1.5, noise: float = 0.1, random_state=0) -> Tensor:
    """Two interleaved Archimedean spirals, radius up to about 3, ``[n, 2]``."""
    rng = _rng(random_state)
    u = np.sqrt(rng.random(n))  # uniform along the arc length
    theta = u * turns * 2 * np.pi
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    r = 3.0 * u
    pts = sign[:, None] * np.stack([r * np.cos(theta), r * np.sin(theta)], 1) + noise * rng.standard_normal((n, 2))
    return torch.as_tensor(pts, dtype=torch.float32)


def toy_data(name: str, n: int, *, random_state=0) -> Tensor:
    """One of the 2-D toys by name: ``'triangle'``, ``'ring'``, ``'moons'`` or ``'spirals'``."""
    makers = {"triangle": triangle_mixture, "ring": ring, "moons": moons, "spirals": spirals}
    if name not in makers:
        raise ValueError(f"Unknown toy {name!r}; use one of {TOYS}.")
    return makers[name](n, random_state=random_state)


# ---- coupled springs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Springs:
    """Two masses between two walls: wall springs ``k_wall``, a coupling spring ``k_couple``, linear damping
    and a cubic stiffening term. The state is ``(q1, v1, q2, v2)``."""

    k_wall: float = 1.0
    k_couple: float = 0.7
    damping: float = 0.08
    cubic: float = 0.08
    dt: float = 0.1

    def rhs(self, s: np.ndarray) -> np.ndarray:
        q1, v1, q2, v2 = np.moveaxis(s, -1, 0)
        a1 = -self.k_wall * q1 - self.k_couple * (q1 - q2) - self.damping * v1 - self.cubic * q1**3
        a2 = -self.k_wall * q2 - self.k_couple * (q2 - q1) - self.damping * v2 - self.cubic * q2**3
        return np.stack([v1, a1, v2, a2], -1)

    def step(self, s: np.ndarray) -> np.ndarray:
        """One classical Runge-Kutta step of size ``dt``."""
        h = self.dt
        k1 = self.rhs(s)
        k2 = self.rhs(s + 0.5 * h * k1)
        k3 = self.rhs(s + 0.5 * h * k2)
        k4 = self.rhs(s + h * k3)
        return s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def energy(self, s: np.ndarray | Tensor) -> np.ndarray:
        """Kinetic plus potential energy (unit masses), conserved when ``damping == 0``."""
        s = np.asarray(s, dtype=np.float64)
        q1, v1, q2, v2 = np.moveaxis(s, -1, 0)
        pot = 0.5 * self.k_wall * (q1**2 + q2**2) + 0.5 * self.k_couple * (q1 - q2) ** 2
        pot = pot + 0.25 * self.cubic * (q1**4 + q2**4)
        return 0.5 * (v1**2 + v2**2) + pot


def simulate_springs(
    n: int,
    *,
    n_steps: int = 50,
    system: Springs | None = None,
    position_scale: float = 3.0,
    velocity_scale: float = 1.5,
    random_state=0,
) -> Tensor:
    """Trajectories of the coupled springs from Gaussian initial states.

    Returns
    -------
    Trajectories ``[n, n_steps, 4]`` (float32), states ``(q1, v1, q2, v2)``; step 0 is the initial state.
    """
    system = system or Springs()
    rng = _rng(random_state)
    q = position_scale * rng.standard_normal((n, 2))
    v = velocity_scale * rng.standard_normal((n, 2))
    s = np.stack([q[:, 0], v[:, 0], q[:, 1], v[:, 1]], -1)
    out = np.empty((n, n_steps, 4))
    for k in range(n_steps):
        out[:, k] = s
        s = system.step(s)
    return torch.as_tensor(out, dtype=torch.float32)


# ---- images --------------------------------------------------------------------------------------------


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (offline), scaled to ``[-1, 1]``.

    Returns
    -------
    images
        ``[1797, 1, 8, 8]`` float32.
    labels
        ``[1797]`` int64.
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.as_tensor(bunch.target, dtype=torch.int64)


def load_images(name: str, root: str | Path, *, train: bool = True, image_size: int | None = None) -> Tensor:
    """MNIST, CIFAR-10 or CelebA from local files through torchvision, scaled to ``[-1, 1]``.

    Nothing is downloaded: the files must already be under ``root`` in torchvision's layout
    (``root/MNIST/raw``, ``root/cifar-10-batches-py``, ``root/celeba``).

    Returns
    -------
    Images ``[N, C, H, W]`` float32 (CelebA center-cropped and resized to ``image_size``, default 64).
    """
    if name not in IMAGES:
        raise ValueError(f"Unknown image set {name!r}; use one of {IMAGES} (or 'digits' for the bundled 8x8 set).")
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as err:
        raise ImportError(
            f"Loading {name!r} needs torchvision: `pip install torchvision` (or `pip install fluxvelo[vision]`). "
            "The bundled 'digits' set works without it."
        ) from err
    root = Path(root)
    tf = [transforms.ToTensor()]
    if name == "celeba":
        size = image_size or 64
        tf = [transforms.CenterCrop(178), transforms.Resize(size)] + tf
    elif image_size is not None:
        tf = [transforms.Resize(image_size)] + tf
    tf = transforms.Compose(tf)
    try:
        if name == "mnist":
            ds = torchvision.datasets.MNIST(root, train=train, download=False, transform=tf)
        elif name == "cifar10":
            ds = torchvision.datasets.CIFAR10(root, train=train, download=False, transform=tf)
        else:
            ds = torchvision.datasets.CelebA(root, split="train" if train else "test", download=False, transform=tf)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        layout = {"mnist": "MNIST/raw/", "cifar10": "cifar-10-batches-py/", "celeba": "celeba/"}[name]
        raise FileNotFoundError(
            f"{name!r} was not found under {root}. Place torchvision's files there ({root / layout}); "
            "fluxvelo never downloads image sets."
        ) from err
    if name in {"mnist", "cifar10"}:  # fast path: the raw arrays
        data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
        x = torch.as_tensor(data, dtype=torch.float32) / 255.0
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if image_size is not None and image_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", antialias=True)
    else:
        x = torch.stack([ds[i][0] for i in range(len(ds))])
    return x * 2 - 1


# ---- one entry point -------------------------------------------------------------------------------------


@dataclass
class Standardiser:
    """Per-feature affine map ``(x - mean) / std`` (broadcast over the sample axis)."""

    mean: Tensor
    std: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def load_dataset(
    name: str, *, n: int = 4000, root: str | Path | None = None, random_state=0
) -> tuple[Tensor, Tensor, Standardiser | None]:
    """Train and held-out sets of a named dataset, ready for training.

    Toys are drawn fresh (``n`` train, ``n`` held out). Springs trajectories are standardised per state
    variable over samples and time (the map is returned). Digits split 80/20 by a fixed permutation.

    Returns
    -------
    train
        ``[N, *shape]``.
    held_out
        ``[M, *shape]``.
    standardiser
        The map applied (springs), else None.
    """
    rng = np.random.default_rng(random_state)
    if name in TOYS:
        return toy_data(name, n, random_state=rng), toy_data(name, n, random_state=rng), None
    if name == "springs":
        train = simulate_springs(n, random_state=rng)
        test = simulate_springs(max(n // 4, 256), random_state=rng)
        st = Standardiser(train.mean((0, 1)), train.std((0, 1)).clamp_min(1e-6))
        return st(train), st(test), st
    if name == "digits":
        x, _ = load_digits()
        perm = torch.as_tensor(np.random.default_rng(0).permutation(len(x)))
        cut = int(0.8 * len(x))
        return x[perm[:cut]], x[perm[cut:]], None
    if name in IMAGES:
        if root is None:
            raise ValueError(f"{name!r} needs root=<folder with torchvision's files>.")
        return load_images(name, root, train=True), load_images(name, root, train=False), None
    raise ValueError(f"Unknown dataset {name!r}; use one of {TOYS + ('springs', 'digits') + IMAGES}.")


def sigma_data(x: Tensor) -> float:
    """Overall standard deviation of a data set (one number), used to scale model inputs."""
    return float(x.float().std())


def log_uniform(n: int, low: float, high: float, generator: torch.Generator | None, device=None) -> Tensor:
    """``n`` draws from the log-uniform law on ``[low, high]``."""
    u = torch.rand(n, generator=generator, device=device)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
