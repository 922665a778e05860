"""Benchmark of fluxvelo.gen on CPU: Flux Matching against DSM on toys, springs and digits.

    python benchmarks/gen_benchmark.py --out gen_benchmark_out            # the default budget (minutes)
    python benchmarks/gen_benchmark.py --out /tmp/g --quick               # a quarter of the steps, smoke test
    python benchmarks/gen_benchmark.py --only triangle,mixing             # some sections

Sections and the targets they check:

- triangle: Flux Matching (FM) and DSM, same steps and batch, reach sliced Wasserstein within 10%; the FM field
  stays on the data law for 10x the training horizon (stationarity test from data, max SW <= 1.5 x the floor).
- mixing: the FM field fine-tuned with the fast-mixing regulariser reaches the plain field's SW in at most half
  the Langevin steps (both fields get the same extra steps).
- rotation: a field with an imposed rotation (I + omega A) grad log q, trained by FM, keeps the law (stationarity
  test); trained by DSM it cannot (it would have to equal the score).
- springs: FM with a causal mask at least as good as DSM with a causal mask (exact W2 between trajectory sets).
- digits: samples recognisable; the classifier-feature Frechet distance of FM within 20% of DSM's.

Every run uses torch.set_num_threads(1); timings are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import fluxvelo as fv
from fluxvelo import gen
from fluxvelo.gen._plots import plot_field, plot_images, plot_points

SIGMA = 0.45  # the paper's triangle setting
LANGEVIN_H = 0.1


def _seed(s):
    return torch.Generator().manual_seed(s)


def _train(model, data, scale, **cfg):
    cfg.setdefault("n_steps", 1000)
    cfg["n_steps"] = max(10, int(cfg["n_steps"] * scale))
    t0 = time.perf_counter()
    tr = gen.Trainer(model, data, gen.TrainConfig(**cfg), device="cpu").fit()
    return tr, time.perf_counter() - t0


def _mlp(seed=0):
    return gen.seeded_init(gen.MLPField(2, hidden=64, depth=3), _seed(seed))


def _sw_curve(model, ref, grid, n):
    out = []
    for k in grid:
        s = gen.langevin(model, n, shape=(2,), sigma=SIGMA, n_steps=k, step_size=LANGEVIN_H, init_std=3.0,
                         random_state=3, device="cpu")
        out.append(gen.sliced_wasserstein(s, ref))
    return out


def _steps_to(curve, grid, tau):
    hit = [k for k, v in zip(grid, curve) if v <= tau]
    return hit[0] if hit else math.inf


def triangle(res, scale, out):
    train, held, _ = gen.load_dataset("triangle", n=10000, random_state=0)
    ref = held[5000:] + SIGMA * torch.randn(5000, 2, generator=_seed(11))
    base = dict(sigma=SIGMA, n_steps=6000, batch_size=256, lr=1e-3, lr_schedule="cosine", ema_decay=0.995)
    fm, t_fm = _train(_mlp(), train, scale, objective="flux", proposal=True, **base)
    dsm, t_dsm = _train(_mlp(), train, scale, objective="dsm", **base)
    row = {"train_seconds": {"flux": t_fm, "dsm": t_dsm}, "steps": fm.step}
    for name, tr in (("flux", fm), ("dsm", dsm)):
        s = gen.langevin(tr.ema.model, 5000, shape=(2,), sigma=SIGMA, n_steps=320, step_size=LANGEVIN_H,
                         init_std=3.0, random_state=3, device="cpu")
        row[name] = {"sw": gen.sliced_wasserstein(s, ref), "mmd": gen.mmd(s[:2000], ref[:2000])}
        st = gen.stationarity_test(tr.ema.model, held[:5000], sigma=SIGMA, total_time=40.0, step_size=LANGEVIN_H,
                                   n_checkpoints=8, random_state=5, device="cpu")
        row[name]["stationarity"] = st
        plot_points(s[:2000], reference=ref[:2000], ax=_ax(out, f"triangle_{name}.png"))
    row["floor_sw"] = gen.sliced_wasserstein(held[:5000] + SIGMA * torch.randn(5000, 2, generator=_seed(12)), ref)
    row["sw_gap"] = abs(row["flux"]["sw"] - row["dsm"]["sw"]) / row["dsm"]["sw"]
    st = row["flux"]["stationarity"]
    row["targets"] = {
        "sw_within_10pct": row["sw_gap"] <= 0.10,
        "flux_stationary_10H": max(st["from_data"]) <= 1.5 * st["floor"],
    }
    res["triangle"] = row
    return fm


def mixing(res, scale, out, fm):
    train, held, _ = gen.load_dataset("triangle", n=10000, random_state=0)
    ref = held[5000:] + SIGMA * torch.randn(5000, 2, generator=_seed(11))
    fields = {}
    times = {}
    for name, weight in (("plain", 0.0), ("fast_mixing", 10.0)):
        model = _mlp()
        if fm is not None:
            model.load_state_dict(fm.ema.model.state_dict())  # both continue from the same FM field
        tr, times[name] = _train(model, train, scale, objective="flux", sigma=SIGMA, proposal=True, n_steps=1500,
                                 batch_size=256, lr=3e-4, lr_schedule="cosine", ema_decay=0.995,
                                 mixing_weight=weight, mixing_steps=10, mixing_step_size=LANGEVIN_H,
                                 mixing_start_std=3.0, random_state=1)
        fields[name] = tr.ema.model
    grid = [5, 10, 15, 20, 30, 40, 60, 80, 120, 160, 240, 320]
    curves = {k: _sw_curve(m, ref, grid, 5000) for k, m in fields.items()}
    tau = 1.1 * curves["plain"][-1]
    steps = {k: _steps_to(c, grid, tau) for k, c in curves.items()}
    st = gen.stationarity_test(fields["fast_mixing"], held[:5000], sigma=SIGMA, total_time=40.0,
                               step_size=LANGEVIN_H, n_checkpoints=8, random_state=5, device="cpu")
    res["mixing"] = {
        "grid": grid, "curves": curves, "threshold": tau, "steps_to_threshold": steps, "train_seconds": times,
        "fast_mixing_stationarity": st,
        "targets": {"half_the_steps": steps["fast_mixing"] <= 0.5 * steps["plain"]},
    }


def rotation(res, scale, out):
    train, held, _ = gen.load_dataset("triangle", n=10000, random_state=0)
    base = dict(sigma=SIGMA, n_steps=4000, batch_size=256, lr=1e-3, lr_schedule="cosine", ema_decay=0.995)
    row = {}
    for obj in ("flux", "dsm"):
        model = gen.seeded_init(gen.RotationalField(2, omega=2.0, hidden=64, depth=3), _seed(0))
        tr, dt = _train(model, train, scale, objective=obj, proposal=obj == "flux", **base)
        st = gen.stationarity_test(tr.ema.model, held[:5000], sigma=SIGMA, total_time=40.0, step_size=0.05,
                                   n_checkpoints=8, random_state=5, device="cpu")
        row[obj] = {"train_seconds": dt, "stationarity": st}
        plot_field(tr.ema.model, sigma=SIGMA, ax=_ax(out, f"rotation_field_{obj}.png"), title=f"(I + 2A) grad log q, {obj}")
    fl, ds = row["flux"]["stationarity"], row["dsm"]["stationarity"]
    row["targets"] = {
        "flux_keeps_law": max(fl["from_data"]) <= 1.5 * fl["floor"],
        "dsm_cannot": ds["from_data"][-1] > 3 * ds["floor"],
    }
    res["rotation"] = row


def springs(res, scale, out):
    train, held, _ = gen.load_dataset("springs", n=2000, random_state=0)
    test = held[:400]
    row = {"floor_w2": gen.wasserstein(train[:400], test)}
    for obj in ("flux", "dsm"):
        model = gen.seeded_init(gen.TrajectoryTransformer(50, 4, hidden=32, depth=2, heads=2, causal=True), _seed(0))
        extra = {"n_levels": 8, "normaliser": True, "proposal": True} if obj == "flux" else {}
        tr, dt = _train(model, train, scale, objective=obj, sigma_min=0.02, sigma_max=20.0, n_steps=600,
                        batch_size=64, lr=2e-3, lr_schedule="cosine", ema_decay=0.99, **extra)
        s = gen.annealed_langevin(tr.ema.model, 400, shape=(50, 4), sigma_min=0.02, sigma_max=20.0, n_levels=100,
                                  steps_per_level=3, step_size=0.5, random_state=1, device="cpu")
        row[obj] = {"train_seconds": dt, "w2": gen.wasserstein(s, test), "sw": gen.sliced_wasserstein(s, test)}
    row["targets"] = {"flux_causal_at_least_dsm_causal": row["flux"]["w2"] <= row["dsm"]["w2"]}
    res["springs"] = row


def digits(res, scale, out):
    train, held, _ = gen.load_dataset("digits")
    x, y = gen.load_digits()
    clf = gen.train_digit_classifier(x, y)
    row = {"floor_frechet": gen.classifier_frechet_distance(train[:360], held, clf)}
    for obj in ("flux", "dsm"):
        model = gen.seeded_init(gen.UNetField(1, width=16, levels=2, sigma_data=0.5), _seed(0))
        extra = {"n_levels": 4, "normaliser": True, "proposal": True} if obj == "flux" else {}
        tr, dt = _train(model, train, scale, objective=obj, sigma_min=0.02, sigma_max=10.0, n_steps=600,
                        batch_size=128, lr=2e-3, lr_schedule="cosine", ema_decay=0.99, **extra)
        s = gen.predictor_corrector(tr.ema.model, 360, shape=(1, 8, 8), sigma_min=0.02, sigma_max=10.0,
                                    n_levels=100, random_state=1, device="cpu")
        row[obj] = {"train_seconds": dt, "frechet": gen.classifier_frechet_distance(s, held, clf),
                    **gen.recognisability(s, clf)}
        plot_images(s[:100], ax=_ax(out, f"digits_{obj}.png"), title=f"{obj}, 8x8 digits")
    row["targets"] = {
        "frechet_within_20pct": row["flux"]["frechet"] <= 1.2 * row["dsm"]["frechet"],
        "recognisable": row["flux"]["confident_fraction"] >= 0.6,
    }
    res["digits"] = row


_FIGS = []


def _ax(out, name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4))
    FigureCanvasAgg(fig)
    _FIGS.append((fig, Path(out) / name))
    return fig.add_subplot()


def _fmt(x, nd=3):
    return "inf" if x == math.inf else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def report(res) -> str:
    """Markdown tables of the results."""
    lines = []
    if "triangle" in res:
        r = res["triangle"]
        lines += ["### Triangle mixture (sigma = 0.45, single level)", "",
                  "| objective | train s | SW | MMD | stationarity: SW from data at t = 0 .. 40 (floor) | from noise at t = 40 |",
                  "|---|---|---|---|---|---|"]
        for k in ("flux", "dsm"):
            st = r[k]["stationarity"]
            traj = " ".join(_fmt(v, 3) for v in st["from_data"])
            cells = [k, f"{r['train_seconds'][k]:.0f}", f"{r[k]['sw']:.4f}", f"{r[k]['mmd']:.4f}",
                     f"{traj} ({st['floor']:.3f})", f"{st['from_noise'][-1]:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"SW floor (two draws of the law, 5000 points each): {r['floor_sw']:.4f}; "
                  f"relative SW gap {r['sw_gap']:.1%}.", ""]
    if "mixing" in res:
        r = res["mixing"]
        lines += ["### Fast-mixing regulariser (Langevin from N(0, 3^2), h = 0.1)", "",
                  "| field | " + " | ".join(str(k) for k in r["grid"]) + " | steps to SW <= " + f"{r['threshold']:.3f} |",
                  "|---|" + "---|" * (len(r["grid"]) + 1)]
        for k in ("plain", "fast_mixing"):
            curve = " | ".join(f"{v:.3f}" for v in r["curves"][k])
            lines.append(f"| {k} | {curve} | {_fmt(r['steps_to_threshold'][k])} |")
        st = r["fast_mixing_stationarity"]
        lines += ["", "Fast-mixing field, stationarity from data (t = 0 .. 40): "
                  + " ".join(f"{v:.3f}" for v in st["from_data"]) + f" (floor {st['floor']:.3f}).", ""]
    if "rotation" in res:
        r = res["rotation"]
        lines += ["### Imposed rotation f = (I + 2A) grad log q", "",
                  "| objective | train s | SW from data, t = 0 .. 40 | from noise, t = 40 | floor |", "|---|---|---|---|---|"]
        for k in ("flux", "dsm"):
            st = r[k]["stationarity"]
            lines.append(f"| {k} | {r[k]['train_seconds']:.0f} | " + " ".join(f"{v:.3f}" for v in st["from_data"])
                         + f" | {st['from_noise'][-1]:.3f} | {st['floor']:.3f} |")
        lines.append("")
    if "springs" in res:
        r = res["springs"]
        lines += ["### Coupled springs, causal transformer (trajectories R^{50x4}, standardised)", "",
                  "| objective | train s | W2 | SW |", "|---|---|---|---|"]
        for k in ("flux", "dsm"):
            lines.append(f"| {k} + causal | {r[k]['train_seconds']:.0f} | {r[k]['w2']:.2f} | {r[k]['sw']:.3f} |")
        lines += ["", f"W2 floor (400 training vs 400 held-out trajectories): {r['floor_w2']:.2f}.", ""]
    if "digits" in res:
        r = res["digits"]
        lines += ["### 8x8 digits, small U-Net", "",
                  "| objective | train s | classifier Frechet | confident (p > 0.9) | class entropy (max 2.30) |",
                  "|---|---|---|---|---|"]
        for k in ("flux", "dsm"):
            cells = [k, f"{r[k]['train_seconds']:.0f}", f"{r[k]['frechet']:.2f}", f"{r[k]['confident_fraction']:.2f}",
                     f"{r[k]['class_entropy']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Frechet floor (360 training vs held-out digits): {r['floor_frechet']:.2f}.", ""]
    lines += ["### Targets", "", "| section | target | holds |", "|---|---|---|"]
    for sec, r in res.items():
        for name, ok in r.get("targets", {}).items():
            lines.append(f"| {sec} | {name} | {'yes' if ok else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gen_benchmark_out")
    p.add_argument("--quick", action="store_true", help="A quarter of the training steps.")
    p.add_argument("--only", default="triangle,mixing,rotation,springs,digits")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fv.settings.progress_bar = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = 0.25 if args.quick else 1.0
    only = args.only.split(",")
    res, t0 = {}, time.perf_counter()
    fm = None
    sections = {"triangle": None, "mixing": None, "rotation": rotation, "springs": springs, "digits": digits}
    for name in sections:
        if name not in only:
            continue
        t1 = time.perf_counter()
        if name == "triangle":
            fm = triangle(res, scale, out)
        elif name == "mixing":
            mixing(res, scale, out, fm)
        else:
            sections[name](res, scale, out)
        print(f"[{name}] {time.perf_counter() - t1:.0f} s", flush=True)
    total = time.perf_counter() - t0
    for fig, path in _FIGS:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    res["_meta"] = {"total_seconds": total, "quick": args.quick, "torch": torch.__version__,
                    "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    text = report({k: v for k, v in res.items() if not k.startswith("_")})
    (out / "results.md").write_text(text + f"\n\nTotal {total:.0f} s.\n", encoding="utf-8")
    print(text)
    print(f"\nTotal {total:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
