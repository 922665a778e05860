"""Command line: ``fluxvelo gen train ...`` and ``fluxvelo gen sample ...`` (also ``python -m fluxvelo.gen``)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ._data import IMAGES, TOYS, load_dataset, load_digits, sigma_data
from ._metrics import (
    classifier_frechet_distance,
    mmd,
    recognisability,
    sliced_wasserstein,
    train_digit_classifier,
    wasserstein,
)
from ._models import MODELS, build_model, seeded_init
from ._plots import save_sample_figure
from ._sampling import SAMPLERS
from ._train import TrainConfig, Trainer, load_checkpoint

logger = logging.getLogger("fluxvelo")

# Per family: default model and noise range (data scaled as load_dataset returns it).
FAMILY_DEFAULTS = {
    "points": {"model": "mlp", "sigma_min": 0.02, "sigma_max": 5.0},
    "trajectories": {"model": "transformer", "sigma_min": 0.02, "sigma_max": 20.0},
    "images": {"model": "unet", "sigma_min": 0.01, "sigma_max": 10.0},
}


def _family(dataset: str) -> str:
    if dataset in TOYS:
        return "points"
    return "trajectories" if dataset == "springs" else "images"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="Train a field with Flux Matching or DSM, then sample and evaluate it.")
    p.add_argument("--data", required=True, choices=[*TOYS, "springs", "digits", *IMAGES])
    p.add_argument("--data-root", help="Folder with torchvision's files (MNIST, CIFAR-10, CelebA).")
    p.add_argument("--n-train", type=int, default=4000, help="Samples to draw for toys and springs.")
    p.add_argument("--out", required=True, help="Output folder (checkpoint, samples, plots, metrics.json).")
    p.add_argument("--model", choices=sorted(MODELS), help="Default: mlp (toys), transformer (springs), unet (images).")
    p.add_argument("--hidden", type=int, help="Width of the MLP / transformer (U-Net: base channels).")
    p.add_argument("--depth", type=int, help="Layers of the MLP / transformer blocks.")
    p.add_argument("--causal", action="store_true", help="Causal attention mask (transformer).")
    p.add_argument("--omega", type=float, default=2.0, help="Imposed rotation (rotational model).")
    p.add_argument("--objective", choices=["flux", "dsm"], default="flux")
    p.add_argument("--sigma", type=float, help="Single noise level; default: anneal over --sigma-min..--sigma-max.")
    p.add_argument("--sigma-min", type=float)
    p.add_argument("--sigma-max", type=float)
    p.add_argument("--n-levels", type=int, default=4, help="Noise levels per step (annealed Flux Matching).")
    p.add_argument("--normaliser", action="store_true", help="Learned per-sigma loss normaliser.")
    p.add_argument("--proposal", action="store_true", help="Learned proposal over the rollout time.")
    p.add_argument("--horizon", type=float, default=4.0)
    p.add_argument("--n-substeps", type=int, default=4)
    p.add_argument("--mixing-weight", type=float, default=0.0, help="Fast-mixing regulariser weight (0: off).")
    p.add_argument("--mixing-steps", type=int, default=2)
    p.add_argument("--mixing-step-size", type=float, default=0.5)
    p.add_argument("--mixing-start-std", type=float, help="Regulariser chains start from N(0, std^2).")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay.")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="Continue from OUT/checkpoint.pt.")
    _add_sampling_options(p)


def _add_sampling_options(p) -> None:
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), help="Default: langevin (single sigma), else pc.")
    p.add_argument("--sampler-steps", type=int, help="Langevin steps, or noise levels (annealed / pc).")
    p.add_argument("--step-size", type=float, help="Langevin step size in rollout time.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch (torch.set_num_threads); default: torch's.")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="Sample from a trained checkpoint and evaluate the samples.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-ema", action="store_true", help="Use the raw weights instead of the EMA.")
    _add_sampling_options(p)


def add_gen_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` and ``sample`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="gen_command", required=True)
    _add_train(sub)
    _add_sample(sub)
    parser.set_defaults(func=main_gen)
    return parser


def add_gen_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``gen`` (with ``train`` and ``sample``) on the top-level CLI's ``subparsers``."""
    parser = subparsers.add_parser("gen", help="Generative models trained with Flux Matching.")
    return add_gen_commands(parser)


def _model_options(args, family: str, shape, sd: float) -> dict:
    kind = args.model or FAMILY_DEFAULTS[family]["model"]
    opts: dict = {"sigma_data": sd}
    if kind in {"mlp", "rotational"}:
        opts.update(hidden=args.hidden or 128, depth=args.depth or 3)
        if kind == "rotational":
            opts["omega"] = args.omega
    elif kind == "transformer":
        opts.update(hidden=args.hidden or 32, depth=args.depth or 2, heads=2, causal=args.causal)
    else:
        opts.update(width=args.hidden or 32)
    return {"kind": kind, "shape": list(shape), "options": opts}


def _held_out(meta: dict):
    _, held_out, _ = load_dataset(meta["dataset"], n=meta["n_train"], root=meta.get("root"), random_state=meta["data_seed"])
    return held_out


def _sample(model, cfg: dict, meta: dict, args) -> torch.Tensor:
    shape = tuple(meta["shape"])
    single = cfg["sigma"] is not None
    name = args.sampler or ("langevin" if single else "pc")
    common = {"random_state": args.seed, "device": args.device, "batch_size": 500}
    if name == "langevin":
        sigma = cfg["sigma"] if single else cfg["sigma_min"]
        return SAMPLERS[name](
            model, args.n_samples, shape=shape, sigma=sigma, n_steps=args.sampler_steps or 400,
            step_size=args.step_size or 0.1, init_std=3.0 * meta["sigma_data"], **common,
        )
    if single:
        raise ValueError("A model trained at a single sigma samples with --sampler langevin.")
    opts = {"sigma_min": cfg["sigma_min"], "sigma_max": cfg["sigma_max"], "sigma_data": meta["sigma_data"]}
    if name == "annealed":
        opts.update(n_levels=args.sampler_steps or 100, step_size=args.step_size or 0.5)
    else:
        opts.update(n_levels=args.sampler_steps or 200, corrector_step=args.step_size or 0.3)
    return SAMPLERS[name](model, args.n_samples, shape=shape, **opts, **common)


def evaluate(samples: torch.Tensor, held_out: torch.Tensor, family: str, dataset: str) -> dict:
    """Distances of generated samples to held-out data (what suits the data family)."""
    n = min(len(samples), len(held_out))
    out = {
        "sliced_wasserstein": sliced_wasserstein(samples, held_out),
        "mmd": mmd(samples[:2000], held_out[:2000]),
    }
    if family == "trajectories":
        out["wasserstein"] = wasserstein(samples[:n], held_out[:n])
    if dataset == "digits":
        x, y = load_digits()
        clf = train_digit_classifier(x, y)
        out["classifier_frechet_distance"] = classifier_frechet_distance(samples, held_out, clf)
        out.update(recognisability(samples, clf))
    return out


def _write_outputs(out: Path, samples, held_out, meta: dict, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples.numpy())
    save_sample_figure(samples, meta["family"], out / "samples.png", reference=held_out[: len(samples)])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def _train(args) -> dict:
    out = Path(args.out)
    family = _family(args.data)
    train, held_out, standardiser = load_dataset(args.data, n=args.n_train, root=args.data_root, random_state=args.seed)
    sd = sigma_data(train)
    spec = _model_options(args, family, train.shape[1:], sd)
    defaults = FAMILY_DEFAULTS[family]
    config = TrainConfig(
        objective=args.objective,
        sigma=args.sigma,
        sigma_min=None if args.sigma is not None else (args.sigma_min or defaults["sigma_min"]),
        sigma_max=None if args.sigma is not None else (args.sigma_max or defaults["sigma_max"]),
        n_levels=args.n_levels,
        normaliser=args.normaliser,
        proposal=args.proposal,
        horizon=args.horizon,
        n_substeps=args.n_substeps,
        mixing_weight=args.mixing_weight,
        mixing_steps=args.mixing_steps,
        mixing_step_size=args.mixing_step_size,
        mixing_start_std=args.mixing_start_std,
        batch_size=args.batch_size,
        lr=args.lr,
        n_steps=args.steps,
        lr_schedule=args.lr_schedule,
        ema_decay=args.ema,
        grad_clip=args.grad_clip,
        random_state=args.seed,
    )
    meta = {"dataset": args.data, "family": family, "n_train": args.n_train, "root": args.data_root,
            "data_seed": args.seed, "sigma_data": sd, **spec}
    if standardiser is not None:
        meta["standardiser"] = {k: v.tolist() for k, v in standardiser.state_dict().items()}
    model = build_model(spec["kind"], tuple(spec["shape"]), **spec["options"])
    model = seeded_init(model, torch.Generator().manual_seed(args.seed))
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        trainer = Trainer.resume(ckpt, model, train, device=args.device)
        trainer.config.n_steps = args.steps
    else:
        trainer = Trainer(model, train, config, device=args.device, meta=meta)
    t0 = time.perf_counter()
    trainer.fit(args.steps, checkpoint=ckpt, checkpoint_every=args.checkpoint_every)
    train_time = time.perf_counter() - t0
    samples = _sample(trainer.ema.model, trainer.state_dict()["config"], trainer.meta, args)
    metrics = {"train_seconds": train_time, "steps": trainer.step, "final_loss": trainer.history["loss"][-1]}
    metrics.update(evaluate(samples, held_out, family, args.data))
    _write_outputs(out, samples, held_out, trainer.meta, metrics)
    (out / "config.json").write_text(json.dumps({"train": trainer.state_dict()["config"], "meta": trainer.meta}, indent=2), encoding="utf-8")
    logger.info("gen train: wrote checkpoint, samples and metrics to %s", out)
    return metrics


def _sample_command(args) -> dict:
    state = load_checkpoint(args.checkpoint)
    meta = state["meta"]
    model = build_model(meta["kind"], tuple(meta["shape"]), **meta["options"])
    model.load_state_dict(state["model"] if args.no_ema else state["ema"])
    samples = _sample(model.eval(), state["config"], meta, args)
    held_out = _held_out(meta)
    metrics = evaluate(samples, held_out, meta["family"], meta["dataset"])
    _write_outputs(Path(args.out), samples, held_out, meta, metrics)
    logger.info("gen sample: wrote samples and metrics to %s", args.out)
    return metrics


def main_gen(args: argparse.Namespace) -> int:
    """Run ``gen train`` or ``gen sample`` from parsed arguments; returns the exit status."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    metrics = _train(args) if args.gen_command == "train" else _sample_command(args)
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fluxvelo.gen``."""
    parser = argparse.ArgumentParser(prog="python -m fluxvelo.gen", description="Flux Matching generative models.")
    add_gen_commands(parser)
    args = parser.parse_args(argv)
    return args.func(args)
