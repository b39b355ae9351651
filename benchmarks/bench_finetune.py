"""Human-in-the-loop fine-tuning: held-out Dice against CPU seconds, next to a MONAI recipe.

The default model (grey fluorescence nuclei, BBBC039) is fine-tuned with the engine's own
``training.iter_train`` — the code the napari widget runs — on ``--n-train`` images of the
stained-tissue set ``dsb2018-stained`` (the "corrected slices": a seeded random choice, listed in
the output), and scored on all the other images of that set (held out: never seen in training nor
in validation). In the same run, a reference recipe is trained for the same wall-clock time on
the same patches: MONAI ``BasicUNet(spatial_dims=2, in_channels=3, out_channels=1)`` (default
features) with ``DiceFocalLoss(sigmoid=True)`` and Adam (lr 1e-3), from scratch (MONAI has no
pretrained 2D nuclei U-Net to start from). Both draw their batches from our ``PatchSampler``
(same images, same normalisation, same augmentation, same seed, batch and patch size), so only
the model, loss and optimiser differ.

Clocks. "Training seconds" count only the time spent inside training (the engine's generator, or
the reference's steps): loading, batch sampling, forward/backward, and — for the engine — its own
validation passes on its validation split. Held-out evaluations (every ``--every`` seconds) are
excluded from both clocks. The engine's time budget is kept on the same clock by raising
``config.time_budget_s`` by the evaluation time spent so far before each resume.

Thresholds. What each recipe would use in practice: the engine's model at time ``t`` is exactly
what ``iter_train`` would return if its budget ran out at ``t`` (validate the current weights,
keep the best validated weights, sweep the threshold on the validation split); the final point
is the ``TrainResult`` itself. The reference uses 0.5. Both are also reported at their
Dice-optimal threshold *on the held-out images* — an optimistic, secondary figure.

    python benchmarks/bench_finetune.py             # 120 s each; writes docs/finetune_curve.png
    python benchmarks/bench_finetune.py --quick     # a short smoke run (plot to a temp folder)
    python benchmarks/bench_finetune.py --budget 60 --seed 1 --data /path/to/data
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_general's Otsu reference
TARGET_DICE = 0.85


@dataclass
class Point:
    """One held-out evaluation of a recipe after ``t`` training seconds."""

    t: float
    steps: int
    threshold: float  # the threshold the recipe would use in practice
    dice: float  # pooled held-out Dice at that threshold
    best_threshold: float  # Dice-optimal threshold on the held-out images (optimistic)
    best_dice: float
    dice05: float = float("nan")  # pooled held-out Dice at 0.5
    note: str = ""


@dataclass
class Run:
    name: str
    points: list[Point] = field(default_factory=list)
    eval_s: float = 0.0  # held-out evaluation time, excluded from the training clock
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- evaluation


def predict_probs(
    forward: Callable[[Any], Any], images: Sequence[np.ndarray], batch: int = 8
) -> list[np.ndarray]:
    """Sigmoid probabilities (float16, as prediction caches them) of whole prepared images."""
    import torch

    out: list[np.ndarray] = []
    with torch.no_grad():
        i = 0
        while i < len(images):
            shape = images[i].shape
            j = i
            while j < len(images) and j - i < batch and images[j].shape == shape:
                j += 1
            x = torch.from_numpy(np.stack(images[i:j]))
            p = torch.sigmoid(forward(x)[:, 0]).to(torch.float16).numpy()
            out.extend(p)
            i = j
    return out


def score(
    probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float
) -> tuple[float, float, float, float]:
    """``(pooled Dice at threshold, Dice-optimal threshold, its Dice, Dice at 0.5)`` over all
    held-out pixels."""
    from napari_bulbseg.metrics import DEFAULT_THRESHOLDS, best_threshold, threshold_sweep

    curve = threshold_sweep(probs, masks, sorted({*DEFAULT_THRESHOLDS, threshold, 0.5}))
    dice = next(d for t, d in curve if t == threshold)
    d05 = next(d for t, d in curve if t == 0.5)
    t_best, d_best = best_threshold([td for td in curve if td[0] in DEFAULT_THRESHOLDS])
    return dice, t_best, d_best, d05


def eval_model(
    model: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float
) -> tuple[float, float, float, float]:
    model = model.eval()
    return score(predict_probs(model, images), masks, threshold)


# --------------------------------------------------------------------------- our engine


def run_ours(
    args: argparse.Namespace, base: Any, train_s: list, held: list, checkpoints: list[float]
) -> tuple[Run, Any]:
    from napari_bulbseg.data import prepare_sample
    from napari_bulbseg.training import TrainConfig, TrainRun

    config = TrainConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        time_budget_s=args.budget,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        lr=args.lr,
        loss=args.loss,
        seed=args.seed,
        channel_mode=args.channel_mode,
        freeze_bn=args.freeze_bn,
        start=args.start,
        refine_lr_factor=args.refine_lr_factor,
        num_threads=args.threads,
        device="cpu",
    )
    run = Run("ours")
    masks = [s.mask for s in held]
    engine = TrainRun(config, train_s, base=base, name="bench-finetune")
    gen = engine.events()
    prepared: dict[tuple[int, str], list[np.ndarray]] = {}
    clock, excluded, result, step = 0.0, 0.0, None, 0
    pending = list(checkpoints)
    while result is None:
        config.time_budget_s = args.budget + excluded  # the engine's clock includes our pauses
        ts = time.perf_counter()
        try:
            ev = next(gen)
        except StopIteration as stop:
            result = stop.value
        clock += time.perf_counter() - ts
        if result is not None:
            break
        step = ev.step
        if ev.kind != "step" or not pending or clock < pending[0]:
            continue
        while pending and clock >= pending[0]:
            pending.pop(0)
        te = time.perf_counter()
        snap = engine.snapshot()  # what the engine would return if it stopped now
        key = (snap.in_channels, snap.prep_policy)
        if key not in prepared:
            prepared[key] = [prepare_sample(s, key[0], snap.norm, key[1]).image for s in held]
        model, thr, note = snap.model, snap.threshold, snap.note
        d, tb, db, d05 = eval_model(model, prepared[key], masks, thr)
        run.points.append(Point(clock, step, thr, d, tb, db, d05, note))
        print(
            f"  ours  {clock:6.1f} s  step {step:4d}  held-out Dice {d:.4f} @ {thr:.2f} "
            f"({note}); at 0.5 {d05:.4f}; optimal {db:.4f} @ {tb:.2f}",
            flush=True,
        )
        dt = time.perf_counter() - te
        excluded += dt
        run.eval_s += dt
    # the final point: the engine's own TrainResult
    te = time.perf_counter()
    card = result.card
    in_c, prep = (
        card.in_channels,
        ("native" if card.channel_policy == "adapted" else card.channel_policy),
    )
    key = (in_c, prep)
    if key not in prepared:
        prepared[key] = [prepare_sample(s, in_c, card.norm, prep).image for s in held]
    d, tb, db, d05 = eval_model(result.model, prepared[key], masks, result.threshold)
    note = f"TrainResult ({result.stop_reason}, best epoch {result.best_epoch})"
    steps = int(card.training["steps_run"])
    run.points.append(Point(clock, steps, result.threshold, d, tb, db, d05, note))
    print(
        f"  ours  {clock:6.1f} s  step {card.training['steps_run']:4d}  held-out Dice {d:.4f} @ "
        f"{result.threshold:.2f} ({note}); at 0.5 {d05:.4f}; optimal {db:.4f} @ {tb:.2f}",
        flush=True,
    )
    run.eval_s += time.perf_counter() - te
    split = card.training["samples"]
    run.info = {
        "config": {k: v for k, v in config.to_dict().items() if k != "thresholds"},
        "time_budget_note": "time_budget_s was raised live by the excluded evaluation time",
        "n_train_split": len(split["train"]),
        "n_val_split": len(split["val"]),
        "val_dice": result.val_dice,
        "threshold": result.threshold,
        "stop_reason": result.stop_reason,
        "epochs_run": card.training["epochs_run"],
        "steps_run": card.training["steps_run"],
        "channel_policy": card.channel_policy,
        "freeze_bn": card.training["freeze_bn"],
        "start": card.training.get("start"),
        "refining": card.training.get("refining"),
        "lr_used": card.training.get("lr_used"),
        "val_threshold_curve": [[t, round(d, 4)] for t, d in card.threshold_curve],
    }
    run.info["config"]["time_budget_s"] = args.budget
    return run, result


# --------------------------------------------------------------------------- MONAI reference


def run_monai(
    args: argparse.Namespace, norm: Any, train_s: list, held: list, checkpoints: list[float]
) -> Run:
    import torch
    from monai.losses import DiceFocalLoss
    from monai.networks.nets import BasicUNet

    from napari_bulbseg.data import Augment, PatchSampler, prepare_sample

    run = Run("monai")
    ts = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # the engine seeds its sampler the same way
    train_p = [prepare_sample(s, 3, norm, "native") for s in train_s]
    sampler = PatchSampler(train_p, args.patch_size, 0.5, Augment())
    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1)
    loss_fn = DiceFocalLoss(sigmoid=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    clock = time.perf_counter() - ts
    held_x = [prepare_sample(s, 3, norm, "native").image for s in held]
    masks = [s.mask for s in held]
    pending = list(checkpoints)

    def checkpoint(step: int) -> None:
        te = time.perf_counter()
        d, tb, db, d05 = eval_model(net, held_x, masks, 0.5)
        net.train()
        run.points.append(Point(clock, step, 0.5, d, tb, db, d05))
        print(
            f"  monai {clock:6.1f} s  step {step:4d}  held-out Dice {d:.4f} @ 0.50; "
            f"optimal {db:.4f} @ {tb:.2f}",
            flush=True,
        )
        run.eval_s += time.perf_counter() - te

    step = 0
    while clock < args.budget:
        ts = time.perf_counter()
        x, y, _ = sampler.batch(args.batch_size, rng)  # patches lie inside the images: no padding
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        step += 1
        clock += time.perf_counter() - ts
        if pending and clock >= pending[0] and clock < args.budget:
            while pending and clock >= pending[0]:
                pending.pop(0)
            checkpoint(step)
    checkpoint(step)
    run.info = {
        "model": "monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=3, out_channels=1)",
        "features": list(inspect.signature(BasicUNet).parameters["features"].default),
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "loss": "DiceFocalLoss(sigmoid=True)",
        "optimizer": "Adam(lr=1e-3)",
        "steps_run": step,
        "pretrained": False,
    }
    return run


# --------------------------------------------------------------------------- report


def at_time(run: Run, t: float) -> Point | None:
    """The recipe's state at ``t`` training seconds: its first evaluation at or after ``t``."""
    later = [p for p in run.points if p.t >= t - 1e-9]
    return later[0] if later else (run.points[-1] if run.points else None)


def plot(path: Path, ours: Run, monai: Run, before: dict[str, float], budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    for run, colour, label in (
        (ours, "tab:blue", "napari-bulbseg fine-tuning (the engine's threshold)"),
        (monai, "tab:orange", "MONAI BasicUNet + DiceFocal, from scratch (threshold 0.5)"),
    ):
        t = [p.t for p in run.points]
        ax.plot(t, [p.dice for p in run.points], "o-", color=colour, label=label)
        ax.plot(
            t,
            [p.best_dice for p in run.points],
            ":",
            color=colour,
            alpha=0.7,
            label="  same, held-out-optimal threshold (optimistic)",
        )
    ax.plot(
        [0],
        [before["dice"]],
        "s",
        color="grey",
        label=f"default model before fine-tuning ({before['dice']:.2f})",
    )
    ax.axhline(TARGET_DICE, color="green", lw=1, ls="--", label=f"target {TARGET_DICE}")
    ax.axvline(budget, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training wall-clock seconds, 2 CPU threads (evaluation excluded)")
    ax.set_ylabel(f"pooled Dice on {before['n_images']} held-out images")
    ax.set_title(f"Fine-tuning on {before['n_train']} dsb2018-stained images (H&E-like tissue)")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=-2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds per recipe")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--n-train", type=int, default=10, help="images to fine-tune on")
    ap.add_argument("--seed", type=int, default=0, help="image choice, patches, initialisation")
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--every", type=float, default=15.0, help="held-out evaluation interval (s)")
    ap.add_argument("--model", type=Path, default=None, help="base model (default: bundled)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", type=Path, default=None, help="default docs/finetune_curve.png")
    ap.add_argument("--skip-monai", action="store_true", help="only our recipe (exploration)")
    g = ap.add_argument_group("our recipe (defaults: TrainConfig's)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--steps-per-epoch", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--loss", default=None)
    g.add_argument("--channel-mode", default=None, choices=["adapt", "convert"])
    g.add_argument("--freeze-bn", default=None, choices=["auto", "true", "false"])
    g.add_argument("--start", default=None, choices=["auto", "base", "scratch"])
    g.add_argument("--refine-lr-factor", type=float, default=None)
    args = ap.parse_args(argv)

    import torch

    from napari_bulbseg.data import samples_from_folders
    from napari_bulbseg.model import bundled_model_dir, load_model
    from napari_bulbseg.training import TrainConfig, evaluate_model

    defaults = TrainConfig()
    for name in (
        "epochs",
        "steps_per_epoch",
        "batch_size",
        "patch_size",
        "lr",
        "loss",
        "channel_mode",
        "start",
        "refine_lr_factor",
    ):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    args.freeze_bn = {None: defaults.freeze_bn, "auto": "auto", "true": True, "false": False}[
        args.freeze_bn
    ]
    if args.quick:
        args.budget, args.every = min(args.budget, 10.0), min(args.every, 5.0)
    plot_path = args.plot or (
        Path(tempfile.mkdtemp(prefix="bench_finetune_")) / "finetune_curve.png"
        if args.quick
        else REPO / "docs" / "finetune_curve.png"
    )

    folder = args.data / "dsb2018-stained"
    if not (folder / "images").is_dir():
        print(f"dsb2018-stained not found under {args.data}; pass --data", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load0 = os.getloadavg()
    samples = samples_from_folders(folder / "images", folder / "masks")
    order = sorted(range(len(samples)), key=lambda i: samples[i].source)
    samples = [samples[i] for i in order]
    pick = sorted(
        np.random.default_rng(args.seed).choice(len(samples), args.n_train, replace=False)
    )
    train_s = [samples[i] for i in pick]
    held = [s for i, s in enumerate(samples) if i not in set(pick)]
    if args.quick:
        held = held[:16]
    base = load_model(args.model or bundled_model_dir())
    checkpoints = [args.every * k for k in range(1, int(args.budget / args.every) + 1)]
    checkpoints = [t for t in checkpoints if t < args.budget - 1e-9]

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; load average " + " ".join(f"{v:.2f}" for v in load0)
    )
    print(
        f"base model: {base.card.name} ({base.path.name if base.path else '?'}), "
        f"{base.card.in_channels} channel(s), threshold {base.card.threshold}"
    )
    print(
        f"fine-tuning images (seed {args.seed}, {len(train_s)} of {len(samples)}): "
        + " ".join(s.source[:12] for s in train_s)
    )
    print(f"held-out: {len(held)} images")

    # before: the default model as a user would run it on colour images (luminance), card threshold
    before_m = evaluate_model(base, held, policy="luminance")
    before = {
        "dice": before_m["dice"],
        "threshold": before_m["threshold"],
        "n_images": len(held),
        "n_train": len(train_s),
    }
    print(
        f"before fine-tuning: held-out Dice {before['dice']:.4f} @ {before['threshold']:.2f} "
        "(RGB → luminance, the card's threshold)"
    )

    print(f"our recipe: {args.budget:.0f} s")
    ours, result = run_ours(args, base, train_s, held, checkpoints)
    train_keys = set(result.card.training["samples"]["train"])
    val_names = [s.source[:12] for s in train_s if s.key not in train_keys]
    print(
        f"  engine split: {ours.info['n_train_split']} train / {ours.info['n_val_split']} "
        f"validation ({' '.join(val_names)}); stop: {ours.info['stop_reason']}, "
        f"{ours.info['epochs_run']} epochs, {ours.info['steps_run']} steps"
    )
    monai = Run("monai")
    if not args.skip_monai:
        print(
            f"MONAI reference: {args.budget:.0f} s on the engine's {len(train_keys)} training "
            "images, same patches"
        )
        monai = run_monai(
            args, base.card.norm, [s for s in train_s if s.key in train_keys], held, checkpoints
        )
    load1 = os.getloadavg()

    # ---- table
    print()
    print(
        f"{'seconds':>8} | {'ours t':>7} {'Dice':>6} {'thr':>5} | {'MONAI t':>7} {'Dice':>6} | "
        f"{'ratio':>5} | optimal-threshold Dice ours / MONAI (optimistic)"
    )
    rows = []
    for t in [*checkpoints, args.budget]:
        o, m = at_time(ours, t), at_time(monai, t)
        ratio = float("nan") if m is None else (o.dice / m.dice if m.dice > 0 else float("inf"))
        rows.append((t, o, m, ratio))
        ms = f"{m.t:7.1f} {m.dice:6.4f}" if m else f"{'-':>7} {'-':>6}"
        mb = f"{m.best_dice:.4f}" if m else "-"
        print(
            f"{t:8.0f} | {o.t:7.1f} {o.dice:6.4f} {o.threshold:5.2f} | {ms} | {ratio:5.2f} | "
            f"{o.best_dice:.4f} @ {o.best_threshold:.2f} / {mb}"
        )
    final_o, final_m = ours.points[-1], (monai.points[-1] if monai.points else None)
    first_hit = next((p.t for p in ours.points if p.dice >= TARGET_DICE), None)
    print(
        f"\nours: {before['dice']:.4f} → {final_o.dice:.4f} held-out Dice after {final_o.t:.1f} s; "
        + (f"≥ {TARGET_DICE} first at {first_hit:.1f} s" if first_hit else f"< {TARGET_DICE}")
    )
    if final_m:
        print(
            f"MONAI: {final_m.dice:.4f} after {final_m.t:.1f} s; ratio ours/MONAI at "
            f"{args.budget:.0f} s = {final_o.dice / max(final_m.dice, 1e-12):.2f}"
        )
    # plain Otsu on the same held-out images (luminance; nuclei are the darker class)
    from bench_general import otsu, pooled

    otsu_dice = pooled([(otsu(s.image, True), s.mask) for s in held])
    print(
        f"Otsu (inverted luminance) on the same {len(held)} held-out images: {otsu_dice:.4f}; "
        f"ratio ours/Otsu = {final_o.dice / max(otsu_dice, 1e-12):.2f}"
    )
    print(
        f"held-out evaluation time excluded: ours {ours.eval_s:.0f} s, "
        f"MONAI {monai.eval_s:.0f} s; load average " + " ".join(f"{v:.2f}" for v in load1)
    )

    plot(plot_path, ours, monai, before, args.budget)
    print(f"plot: {plot_path}")

    def pts(run: Run) -> list[dict[str, Any]]:
        return [
            {
                "t": round(p.t, 1),
                "steps": p.steps,
                "threshold": p.threshold,
                "dice": round(p.dice, 4),
                "dice_at_0.5": round(p.dice05, 4),
                "opt_threshold": p.best_threshold,
                "opt_dice": round(p.best_dice, 4),
                **({"note": p.note} if p.note else {}),
            }
            for p in run.points
        ]

    out = {
        "bench": "finetune",
        "budget_s": args.budget,
        "quick": args.quick,
        "seed": args.seed,
        "n_train": len(train_s),
        "n_heldout": len(held),
        "train_images": [s.source for s in train_s],
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_start": [round(v, 2) for v in load0],
        "load_end": [round(v, 2) for v in load1],
        "before": before,
        "ours": {
            "final_dice": round(final_o.dice, 4),
            "t": round(final_o.t, 1),
            **ours.info,
            "eval_s_excluded": round(ours.eval_s, 1),
            "points": pts(ours),
        },
        "monai": {
            "final_dice": round(final_m.dice, 4) if final_m else None,
            "t": round(final_m.t, 1) if final_m else None,
            **monai.info,
            "eval_s_excluded": round(monai.eval_s, 1),
            "points": pts(monai),
        },
        "otsu_dice": round(otsu_dice, 4),
        "ratio_to_otsu": round(final_o.dice / max(otsu_dice, 1e-12), 3),
        "ratio_at_budget": round(final_o.dice / final_m.dice, 3)
        if final_m and final_m.dice
        else None,
        "first_t_at_target": round(first_hit, 1) if first_hit else None,
        "targets": {
            "dice_ge_0.85_within_budget": first_hit is not None,
            "ge_monai_at_equal_time": all(r[3] >= 1 for r in rows if r[2] is not None),
        },
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
