"""A thin training loop with EMA, checkpoint save and resume, and a progress bar."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._utils import make_generators, progress_disabled, resolve_device
from ._losses import flux_or_dsm
from ._mixing import mixing_regulariser
from ._models import seeded_init
from ._proposal import LossNormaliser, TimeProposal


@dataclass
class TrainConfig:
    """Settings of :class:`Trainer`.

    Attributes
    ----------
    objective
        ``'flux'`` (Flux Matching through :mod:`fluxvelo.flux`) or ``'dsm'``.
    sigma
        Train at this single noise level; or leave None and give ``sigma_min``/``sigma_max`` to anneal.
    sigma_min, sigma_max, n_levels
        Log-uniform noise range and the number of levels drawn per step (Flux Matching: one batch group each).
    normaliser, proposal
        Learned per-sigma loss normaliser (annealed Flux Matching); learned truncated-exponential proposal over
        the rollout time (Flux Matching).
    horizon, n_substeps, divergence
        Passed to the estimator core (H, M and the divergence method).
    mixing_weight, mixing_steps, mixing_step_size, mixing_start_std
        Fast-mixing regulariser: weight (0 = off), Langevin steps and their size; chains start from
        ``N(0, mixing_start_std^2)`` when set, else from the data over-dispersed to ``sqrt(2) sigma``.
    batch_size, lr, n_steps, lr_schedule, ema_decay, grad_clip
        Optimisation (Adam) settings; ``lr_schedule`` is ``'constant'`` or ``'cosine'`` (decay to 0 at
        ``n_steps``); ``grad_clip`` None disables clipping.
    random_state
        Seed of every random draw (initialisation by the caller, batches, noise, times).
    """

    objective: str = "flux"
    sigma: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    n_levels: int = 4
    normaliser: bool = False
    proposal: bool = False
    horizon: float = 4.0
    n_substeps: int = 4
    divergence: str = "auto"
    mixing_weight: float = 0.0
    mixing_steps: int = 2
    mixing_step_size: float = 0.5
    mixing_start_std: float | None = None
    batch_size: int = 256
    lr: float = 1e-3
    n_steps: int = 1000
    lr_schedule: str = "constant"
    ema_decay: float = 0.999
    grad_clip: float | None = None
    random_state: int = 0


class EMA:
    """Exponential moving average of a model's parameters; ``ema.model`` is the averaged copy."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p, 1.0 - self.decay)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class Trainer:
    """Train a field ``model(x, sigma)`` on ``data`` ``[N, *shape]`` with Flux Matching or DSM.

    Parameters
    ----------
    model
        The field, moved to ``device``.
    data
        Training samples.
    config
        A :class:`TrainConfig`.
    device
        ``'auto'``, ``'cpu'``, ``'cuda'`` or a :class:`torch.device`.
    meta
        Anything to store in checkpoints alongside (e.g. how to rebuild the model).
    """

    def __init__(self, model: nn.Module, data: Tensor, config: TrainConfig, *, device="auto", meta: dict | None = None):
        self.config, self.meta = config, dict(meta or {})
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.data = data.to(self.device)
        self.generator = make_generators(config.random_state, self.device)[1]
        flux, annealed = config.objective == "flux", config.sigma is None
        init = torch.Generator().manual_seed(config.random_state)  # the helpers' weights, not the global RNG
        use_norm = config.normaliser and flux and annealed
        self.normaliser = seeded_init(LossNormaliser(), init).to(self.device) if use_norm else None
        use_prop = config.proposal and flux
        self.proposal = seeded_init(TimeProposal(config.horizon), init).to(self.device) if use_prop else None
        params = list(self.model.parameters())
        for extra in (self.normaliser, self.proposal):
            if extra is not None:
                params += list(extra.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.ema = EMA(self.model, config.ema_decay)
        self.step = 0
        self.history: dict[str, list[float]] = {"loss": [], "mixing": []}

    def _batch(self) -> Tensor:
        n, b = self.data.shape[0], min(self.config.batch_size, self.data.shape[0])
        idx = torch.randperm(n, generator=self.generator, device=self.device)[:b]
        return self.data[idx]

    def train_step(self) -> float:
        """One optimisation step; returns the field's loss."""
        c = self.config
        x = self._batch()
        terms = flux_or_dsm(
            self.model,
            x,
            objective=c.objective,
            sigma=c.sigma,
            sigma_min=c.sigma_min,
            sigma_max=c.sigma_max,
            n_levels=c.n_levels,
            normaliser=self.normaliser,
            proposal=self.proposal,
            horizon=c.horizon,
            n_substeps=c.n_substeps,
            divergence=c.divergence,
            generator=self.generator,
        )
        total = terms.total
        if c.mixing_weight > 0:
            start = None
            if c.mixing_start_std is not None:
                shape = (x.shape[0] // 2, *x.shape[1:])
                start = c.mixing_start_std * torch.randn(shape, generator=self.generator, device=self.device)
            reg = mixing_regulariser(
                self.model,
                x,
                sigma=float(terms.sigmas[0]),
                n_steps=c.mixing_steps,
                step_size=c.mixing_step_size,
                start=start,
                generator=self.generator,
            )
            total = total + c.mixing_weight * reg
            self.history["mixing"].append(float(reg.detach()))
        if c.lr_schedule == "cosine":
            for group in self.optimizer.param_groups:
                group["lr"] = 0.5 * c.lr * (1 + math.cos(math.pi * min(self.step / max(c.n_steps, 1), 1.0)))
        elif c.lr_schedule != "constant":
            raise ValueError(f"Unknown lr_schedule {c.lr_schedule!r}; use 'constant' or 'cosine'.")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if c.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        loss = float(terms.field.detach())
        self.history["loss"].append(loss)
        return loss

    def fit(
        self, n_steps: int | None = None, *, checkpoint: str | Path | None = None, checkpoint_every: int = 0
    ) -> Trainer:
        """Train until ``n_steps`` steps in total (default ``config.n_steps``), saving checkpoints on the way.

        A progress bar shows the running loss unless ``fluxvelo.settings.progress_bar`` is off.
        """
        from tqdm import tqdm

        total = self.config.n_steps if n_steps is None else n_steps
        bar = tqdm(total=total, initial=self.step, disable=progress_disabled(), desc="gen", leave=False)
        running = None
        while self.step < total:
            loss = self.train_step()
            running = loss if running is None else 0.98 * running + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4g}")
            if checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                self.save(checkpoint)
        bar.close()
        if checkpoint is not None:
            self.save(checkpoint)
        return self

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly where it stopped."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "normaliser": None if self.normaliser is None else self.normaliser.state_dict(),
            "proposal": None if self.proposal is None else self.proposal.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "history": self.history,
            "meta": self.meta,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name in ("normaliser", "proposal"):
            if getattr(self, name) is not None and state[name] is not None:
                getattr(self, name).load_state_dict(state[name])
        self.generator.set_state(state["generator"].cpu())
        self.step = int(state["step"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.meta.update(state.get("meta", {}))

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def resume(cls, path: str | Path, model: nn.Module, data: Tensor, *, device="auto") -> "Trainer":
        """Rebuild a trainer from a checkpoint written by :meth:`save` (``model`` of the same architecture)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainer = cls(model, data, TrainConfig(**state["config"]), device=device, meta=state.get("meta"))
        trainer.load_state_dict(state)
        return trainer


def load_checkpoint(path: str | Path) -> dict:
    """The raw contents of a checkpoint (on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)
