"""A simulated user in the loop: which slices to correct first — the queue, random, file order.

Ground truth plays the user. Each chain starts from a base model and repeats rounds:

1. predict the unlabelled pool with the current model;
2. pick the next slices to correct — ``queue`` (the Review widget's ranking,
   :mod:`napari_bulbseg.ranking`, under the model card's threshold and object rules), ``random``
   (seeded) or ``file`` (name / slice order, what a user does without guidance);
3. "correct" them (their ground truth is copied in) and fine-tune the current model on every slice
   corrected so far, exactly as the Fine-tune widget does (``iter_train``, the widget's settings,
   a fixed time budget, the split into training and validation slices by content hash), and keep
   the new model only when the engine makes it current (it beats the old one on the held-out
   validation slices) — as the plugin does by default;
4. score the current model on held-out images that are never corrected (pooled Dice at the
   model's own threshold, whole images at the scale its card asks for: ``default_diameter``).

Every strategy runs with the same seeds (the fine-tuning seed; and random's choice), rounds
interleaved so a busy machine slows them alike. Sources: ``phantom`` (a bulb stack made by
:func:`~napari_bulbseg.phantom.bulb_phantom`: pool of 30 slices, held out 20 of another stack) and
any DSB2018 source in ``--data`` (pool: its training side, held out: its validation side, the
fixed split of ``scripts/train_default_model.py``; stained images as luminance).

    python benchmarks/bench_hitl.py --source phantom                       # bundled model as base
    python benchmarks/bench_hitl.py --source dsb2018-stained --base MODEL  # e.g. a leave-out model
    python benchmarks/bench_hitl.py --quick                                # a smoke run

Prints held-out Dice per strategy and corrected count (mean over seeds, min–max), the queue's
gain over random at each count, and writes JSON (``--json``) and a plot (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: ``queue-diverse``: the queue with ``rank(diverse=True)`` on unrelated images (exploration;
#: measured worse than the plain queue on stained tissue, docs/hitl.md — not the widget's)
ALL_STRATEGIES = ("queue", "random", "file", "queue-diverse")
STRATEGIES = ("queue", "random", "file")
COLOURS = {
    "queue": "tab:blue",
    "random": "tab:orange",
    "file": "tab:grey",
    "queue-diverse": "tab:green",
}


def load_source(name: str, data: Path, pool_max: int, seed: int) -> tuple[list, list, bool]:
    """(pool samples, held-out samples, whether the pool is one stack)."""
    from napari_bulbseg.data import make_sample

    if name == "phantom":
        from napari_bulbseg.phantom import bulb_phantom

        img, mask = bulb_phantom(n_slices=30, shape=(192, 192), seed=11)
        pool = [make_sample(img[z], mask[z], source=f"pool z{z:02d}") for z in range(len(img))]
        img, mask = bulb_phantom(n_slices=20, shape=(192, 192), seed=12)
        held = [make_sample(img[z], mask[z], source=f"held z{z:02d}") for z in range(len(img))]
        return pool, held, True
    sys.path.insert(0, str(REPO / "scripts"))
    from train_default_model import load_pairs, val_side

    folder = data / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found: give --data (the folder holding {name})")
    pairs = load_pairs(folder / "images", folder / "masks", luminance="stained" in name)
    pool = [s for s in pairs if not val_side(s.source, 0)]
    held = [s for s in pairs if val_side(s.source, 0)]
    if len(pool) > pool_max:  # a fixed, seeded subset keeps every round's prediction short
        keep = np.random.default_rng(1000 + seed).choice(len(pool), pool_max, replace=False)
        pool = [pool[i] for i in sorted(keep)]
    return pool, held, False


#: the queue's error term (``--score-term``; ranking.SCORE_TERMS)
SCORE_TERM = "expected_error"


def pick(
    strategy: str, loaded: Any, pool: list, done: set[int], k: int, rng: np.random.Generator,
    is_stack: bool,
) -> list[int]:  # fmt: skip
    """Indices of the next ``k`` pool slices to correct."""
    todo = [i for i in range(len(pool)) if i not in done]
    if strategy == "file":
        return todo[:k]
    if strategy == "random":
        return sorted(int(i) for i in rng.choice(todo, size=min(k, len(todo)), replace=False))
    from napari_bulbseg.postprocess import PostProcess
    from napari_bulbseg.ranking import rank, score_stack
    from napari_bulbseg.training import model_probs

    spec = PostProcess.from_card(loaded.card)
    probs = model_probs(loaded, pool)
    if is_stack:  # one stack: neighbours are compared
        scores = score_stack(np.stack(probs), spec, is_stack=True, term=SCORE_TERM)
    else:  # unrelated images of different sizes: each scored alone
        scores = []
        for i, p in enumerate(probs):
            (sc,) = score_stack(p, spec, is_stack=False, term=SCORE_TERM)
            scores.append(type(sc)(**{**sc.__dict__, "index": i}))
    diverse = not is_stack and strategy == "queue-diverse"
    ranked = rank(scores, exclude=done, spread=is_stack, diverse=diverse)
    return sorted(s.index for s in ranked[:k])


def chain(
    strategy: str, seed: int, base: Any, pool: list, held: list, counts: list[int],
    budget: float, is_stack: bool, log: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """One simulated user: rounds up to each corrected count in ``counts``."""
    from napari_bulbseg.events import drain
    from napari_bulbseg.model import LoadedModel
    from napari_bulbseg.training import TrainConfig, evaluate_model, iter_train

    rng = np.random.default_rng(seed)
    current, done, rows, cpu = base, set(), [], 0.0
    for n in counts:
        t0 = time.process_time()
        new = pick(strategy, current, pool, done, n - len(done), rng, is_stack)
        done |= set(new)
        samples = [pool[i] for i in sorted(done)]
        cfg = TrainConfig(  # the Fine-tune widget's settings, with the benchmark's budget
            epochs=1000, steps_per_epoch=25, patch_size=256, loss="focal+dice", seed=seed,
            time_budget_s=budget, num_threads=1,
        )  # fmt: skip
        note = ""
        try:
            result = drain(iter_train(cfg, samples, base=current))
            accepted = bool(result.card.training.get("accepted", {}).get("current", True))
            if accepted:
                current = LoadedModel(result.model, result.card, device=current.device)
            note = "kept" if accepted else "not better: previous model kept"
        except Exception as e:  # e.g. a split with no validation slice: the plugin refuses too
            note = f"no fine-tune: {e}"
        cpu += time.process_time() - t0
        held_dice = evaluate_model(current, held)["dice"]
        rows.append({"strategy": strategy, "seed": seed, "corrected": n, "picked": new,
                     "held_out_dice": held_dice, "cpu_s": round(cpu, 1), "note": note})  # fmt: skip
        log(f"  {strategy:6s} seed {seed} corrected {n:3d}: held-out Dice {held_dice:.4f} ({note})")
    return rows


def summarise(rows: list[dict[str, Any]], counts: list[int], base_dice: float) -> list[str]:
    lines = [f"base model held-out Dice {base_dice:.4f}", "corrected  " + "  ".join(
        f"{s:>22s}" for s in STRATEGIES)]  # fmt: skip
    for n in counts:
        cells = []
        for s in STRATEGIES:
            d = [r["held_out_dice"] for r in rows if r["strategy"] == s and r["corrected"] == n]
            cells.append(f"{np.mean(d):.4f} ({min(d):.3f}–{max(d):.3f})" if d else "—")
        q = [r["held_out_dice"] for r in rows if r["strategy"] == "queue" and r["corrected"] == n]
        rnd = [
            r["held_out_dice"] for r in rows if r["strategy"] == "random" and r["corrected"] == n
        ]
        gain = f"   queue − random {np.mean(q) - np.mean(rnd):+.4f}" if q and rnd else ""
        lines.append(f"{n:9d}  " + "  ".join(f"{c:>22s}" for c in cells) + gain)
    return lines


def plot(rows: list[dict[str, Any]], counts: list[int], base_dice: float, title: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in STRATEGIES:
        colour = COLOURS[s]
        xs = [0, *counts]
        per = [[r["held_out_dice"] for r in rows if r["strategy"] == s and r["corrected"] == n]
               for n in counts]  # fmt: skip
        mean = [base_dice] + [float(np.mean(d)) for d in per]
        lo = [base_dice] + [min(d) for d in per]
        hi = [base_dice] + [max(d) for d in per]
        ax.plot(xs, mean, "o-", color=colour, label=s)
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.15)
    ax.set_xlabel("slices corrected")
    ax.set_ylabel("held-out Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="phantom", help="phantom or a DSB2018 source folder name")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--base", default="bundled", help="base model: 'bundled' or a model folder")
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=45.0, help="fine-tuning seconds per round")
    ap.add_argument("--pool-max", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, counts 2 3, 5 s")
    ap.add_argument(
        "--score-term",
        default="expected_error",
        choices=["expected_error", "error_share"],
        help="the queue's error term (ranking.SCORE_TERMS); exploration",
    )
    ap.add_argument("--strategies", nargs="+", choices=ALL_STRATEGIES, default=ALL_STRATEGIES[:3])
    args = ap.parse_args(argv)
    global STRATEGIES
    STRATEGIES = tuple(args.strategies)
    if args.quick:
        args.counts, args.seeds, args.budget, args.pool_max = [2, 3], 1, 5.0, 8

    import torch

    from napari_bulbseg.model import load_model
    from napari_bulbseg.registry import Registry
    from napari_bulbseg.training import evaluate_model

    torch.set_num_threads(1)
    global SCORE_TERM
    SCORE_TERM = args.score_term
    base = load_model(Registry().resolve(args.base))
    pool, held, is_stack = load_source(args.source, args.data, args.pool_max, 0)
    if args.quick:
        held = held[:6]

    def log(msg: str) -> None:
        print(msg, flush=True)

    base_dice = evaluate_model(base, held)["dice"]
    log(
        f"{args.source}: pool {len(pool)}, held out {len(held)}, base {base.name} (held-out "
        f"Dice {base_dice:.4f}); {args.budget:g} s per round; {platform.machine()}"
    )
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for s in STRATEGIES:  # file order differs between seeds only in the training seed
            rows += chain(s, seed, base, pool, held, args.counts, args.budget, is_stack, log)
    lines = summarise(rows, args.counts, base_dice)
    print("\n".join(lines))
    info = {
        "source": args.source, "base": base.name, "score_term": args.score_term,
        "pool": len(pool), "held_out": len(held),
        "budget_s": args.budget, "seeds": args.seeds, "counts": args.counts,
        "base_dice": base_dice, "wall_s": round(time.perf_counter() - t0, 1), "rows": rows,
        "summary": lines,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    if args.plot:
        title = (
            f"{args.source}: base {base.name}, {args.budget:g} s per round, {args.seeds} seed(s)"
        )
        plot(rows, args.counts, base_dice, title, args.plot)
        log(f"plot -> {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
