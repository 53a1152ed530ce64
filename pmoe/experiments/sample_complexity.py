"""Sample complexity (the paper's Figures 4 and 6): test accuracy against the number of training
samples for the single-expert CNN, pMoE with joint training and pMoE with separate training.

    pmoe sample-complexity --data digits-patch --samples 60,120,240,480 --seeds 3 --seed 0 --out runs/sc

Data: one `make_dataset` call per experiment, so the training images and the fixed held-out test
set come from disjoint pools of digit images (or share the synthetic patterns).  Every training
set is exactly class-balanced, N/2 images per class, as in the authors' code: the separate
recipe's router is a class-mean difference, and a few surplus images of one class tilt it
towards the brightest patches.  Repetition r takes its images of class c from positions
[r*M/2, r*M/2 + N/2) of that class in the training pool (M = the largest size), so the sizes are
nested within a repetition and the repetitions use disjoint samples.

Output: DIR/results.json with
    samples: [N, ...]
    curves:  {model: [[test accuracy per repetition] per size]}
    routing: {pMoE model: [[discriminative-routing metrics per repetition] per size]}
             (see pmoe.experiments.routing_metrics.discriminative_routing)
    config:  everything needed to rerun, plus the machine and the wall time
and DIR/sample_complexity.png (mean +- std over repetitions against N, one line per model).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .common import (COLORS, MODEL_SPECS, add_common_arguments, environment, int_list, mean_std, new_figure,
                     positive_int, prepare_out_dir, progress_bar, save_figure, set_threads, train_paper_model,
                     write_json)
from .routing_metrics import discriminative_routing, format_routing, routed_layer_size

DATA = ("digits-patch", "synthetic")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _key_value  # the `pmoe train` KEY=VALUE parser, shared

    p.add_argument("--data", choices=DATA, default="digits-patch",
                   help="offline dataset (default digits-patch; synthetic: the paper's data model)")
    p.add_argument("--samples", type=int_list, default=[60, 120, 240, 480],
                   help="comma-separated training-set sizes (default 60,120,240,480)")
    p.add_argument("--data-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset argument, e.g. noise=0.5 for synthetic (repeatable)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate (and log a line) every this many epochs; default 0: at the end only")
    add_common_arguments(p, "epochs of joint training / of the experts phase (paper: 150)")


def sample_complexity(data: str, samples: Sequence[int], seeds: int = 3, seed: int = 0, epochs: int = 150,
                      router_epochs: int = 100, lr: float = 0.2, batch_size: int = 20, n_test: int = 1000,
                      models: Sequence[str] = tuple(MODEL_SPECS), data_kw: Optional[dict] = None,
                      eval_every: int = 0, progress: bool = True) -> dict:
    """Train every model in `models` on every size in `samples`, `seeds` times; returns the
    results dict described in the module docstring (without writing anything)."""
    from ..data import make_dataset

    samples = sorted(positive_int("each sample size", n) for n in samples)
    seeds, epochs = positive_int("--seeds", seeds), positive_int("--epochs", epochs)
    data_kw = dict(data_kw or {})
    if data not in DATA:
        raise ValueError(f"unknown data {data!r}; expected one of {DATA}")
    start = time.perf_counter()
    half = (samples[-1] + 1) // 2  # images per class in the largest set
    pool, test = make_dataset(data, 2 * seeds * half, positive_int("--n-test", n_test), seed, **data_kw)
    if not bool((test.signal_index >= 0).all()):
        raise ValueError(f"{data} has test images without a discriminative patch: no routing metric")

    curves = {key: [[] for _ in samples] for key in models}
    routing = {key: [[] for _ in samples] for key in models if MODEL_SPECS[key][0] == "pmoe"}
    bar = progress_bar(len(samples) * seeds * len(models), "sample-complexity", progress)
    for i, n in enumerate(samples):
        for r in range(seeds):
            train = balanced_subset(pool, r * half, n)
            for key in models:
                bar.set_postfix_str(f"N={n} rep={r} {key}")
                prefix = f"N={n:<5} rep {r} {key:<13}"
                log = (lambda line, prefix=prefix: tqdm.write(f"{prefix} {line}")) if eval_every else None
                model, history = train_paper_model(key, train, test, seed * 1000 + r, epochs, router_epochs, lr,
                                                   batch_size, eval_every, log)
                acc = history[-1]["test_acc"]
                curves[key][i].append(acc)
                line = f"{prefix} test {100 * acc:5.1f}%"
                if key in routing:
                    metrics = discriminative_routing(history[-1], test.num_patches,
                                                     routed_layer_size(model, test.num_patches))
                    routing[key][i].append(metrics)
                    line += "  " + format_routing(metrics)
                tqdm.write(line)
                bar.update()
    bar.close()

    return {
        "samples": samples,
        "curves": curves,
        "routing": routing,
        "config": {"data": data, "data_args": {k: repr(v) for k, v in data_kw.items()}, "seeds": seeds,
                   "seed": seed, "epochs": epochs, "router_epochs": router_epochs, "lr": lr,
                   "batch_size": batch_size, "n_test": len(test), "models": list(models),
                   "model_args": {key: _model_args(key) for key in models}, "num_patches": test.num_patches,
                   "wall_seconds": round(time.perf_counter() - start, 1), **environment()},
    }


def balanced_subset(pool, start: int, n: int):
    """n images of a binary PatchDataset, n//2 of class 0 and n - n//2 of class 1, taken from
    each class's images in pool order beginning at that class's `start`-th image, then
    shuffled into pool order (the recipes shuffle every epoch anyway)."""
    picks = []
    for c, count in ((0, n // 2), (1, n - n // 2)):
        idx = (pool.y == c).nonzero().flatten()[start:start + count]
        if len(idx) < count:
            raise ValueError(f"the pool holds too few images of class {c} for {n} samples from position {start}")
        picks.append(idx)
    return pool.subset(torch.cat(picks).sort().values)


def _model_args(key: str) -> dict:
    from ..models import default_model_args

    name, training = MODEL_SPECS[key]
    return {"model": name, "training": training, **default_model_args(name, training)}


def summarize(curves: dict) -> dict:
    """{model: {"mean": [...], "std": [...]}} over the repetitions of each size."""
    return {key: {"mean": [mean_std(a)[0] for a in per_size], "std": [mean_std(a)[1] for a in per_size]}
            for key, per_size in curves.items()}


def samples_to_match(samples: Sequence[int], summary: dict) -> dict:
    """For each pMoE model: the smallest N whose mean accuracy reaches the CNN's mean accuracy at the
    largest N (None if none does, {} without a CNN)."""
    if "cnn" not in summary:
        return {}
    target = summary["cnn"]["mean"][-1]
    return {key: next((n for n, m in zip(samples, s["mean"]) if m >= target), None)
            for key, s in summary.items() if key != "cnn"}


def plot(results: dict, path: str) -> None:
    """Mean +- std test accuracy against N, one line per model; the dotted line is the CNN's
    accuracy at the largest N (the paper's figures draw the same reference)."""
    fig = new_figure()
    ax = fig.add_subplot()
    samples, summary = results["samples"], summarize(results["curves"])
    for key, s in summary.items():
        ax.errorbar(samples, [100 * m for m in s["mean"]], [100 * v for v in s["std"]], marker="o", capsize=3,
                    label=key, color=COLORS.get(key))
    if "cnn" in summary:
        ax.axhline(100 * summary["cnn"]["mean"][-1], color="k", ls=":", lw=1,
                   label=f"CNN at N={samples[-1]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(samples, [str(n) for n in samples])
    ax.minorticks_off()
    ax.set_xlabel("training samples N")
    ax.set_ylabel("test accuracy (%)")
    cfg = results["config"]
    ax.set_title(f"{cfg['data']}: {cfg['seeds']} seeds, {cfg['n_test']} test images, {cfg['epochs']} epochs",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    prepare_out_dir(args.out)
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
    results = sample_complexity(args.data, args.samples, args.seeds, args.seed, args.epochs, args.router_epochs,
                                args.lr, args.batch_size, args.n_test, args.models, dict(args.data_arg),
                                args.eval_every, not args.no_progress)
    write_json(os.path.join(args.out, "results.json"), results)
    plot(results, os.path.join(args.out, "sample_complexity.png"))
    print(summary_table(results))
    print(f"wrote {os.path.join(args.out, 'results.json')} and sample_complexity.png "
          f"({results['config']['wall_seconds']:.0f} s)")
    return 0


def summary_table(results: dict) -> str:
    """Markdown table: mean +- std test accuracy (%) per model and size."""
    samples, summary = results["samples"], summarize(results["curves"])
    lines = ["| model | " + " | ".join(f"N={n}" for n in samples) + " |", "|---|" + "---|" * len(samples)]
    for key, s in summary.items():
        cells = [f"{100 * m:.1f} ± {100 * v:.1f}" for m, v in zip(s["mean"], s["std"])]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for key, n in samples_to_match(samples, summary).items():
        lines.append(f"{key} reaches the CNN's mean accuracy at N={samples[-1]} with N={n}" if n is not None else
                     f"{key} does not reach the CNN's mean accuracy at N={samples[-1]} at any N tried")
    return "\n".join(lines)
