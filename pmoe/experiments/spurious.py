"""Spurious correlations (in the spirit of the paper's CelebA experiment, §6): a class-irrelevant
marker tile co-occurs with one class in training; at test it does not.  Which models learn the
class digit and which the shortcut?

    pmoe spurious --data digits-patch --rates 0.5,0.8,0.95 --n-train 480 --seeds 3 --out runs/spurious

Training sets: the marker (a bright box outline, or a fixed digit image with --marker digit) sits
at patch 0 of an image with probability `rate` if its label is 1 and 1 - rate if it is 0
(`pmoe.data.Spurious`); rate 0.5 is no correlation, 0.95 the paper's CelebA split.  Every model
is tested on three held-out test sets: "clean" (no marker), "independent" (marker on half the
images of each class) and "reversed" (marker on every label-0 image and no label-1 image -- the
shortcut now predicts the wrong class).  The last two hold the same images apart from the marker.

Routing: for the pMoE models, `capture_any` (some expert took the class digit) on the reversed
test set, and `marker_routed`: the fraction of marker-bearing reversed test images where some
expert took the marker tile.

Output: DIR/results.json
    rates: [...], test_sets: {name: marker rate or null}
    accuracy: {model: {test set: [[test accuracy per repetition] per rate]}}
    routing:  {pMoE model: {"capture_any": [[...]], "marker_routed": [[...]]}}
    summary:  {model: {test set: {"mean": [...], "std": [...]}}}
    config:   {...}
and DIR/spurious.png: reversed- and independent-test accuracy against the training rate.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import (COLORS, MODEL_SPECS, add_common_arguments, environment, mean_std, new_figure, positive_int,
                     prepare_out_dir, progress_bar, rate_list, save_figure, set_threads, train_paper_model, write_json)

DATA = ("digits-patch", "synthetic")
MARKERS = ("box", "digit")
TEST_SETS: dict[str, Optional[float]] = {"clean": None, "independent": 0.5, "reversed": 0.0}
MARKER_POSITION = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATA, default="digits-patch",
                   help="offline dataset (default digits-patch; synthetic: the paper's data model)")
    p.add_argument("--rates", type=rate_list, default=[0.5, 0.8, 0.95],
                   help="training P(marker | label 1) = 1 - P(marker | label 0), comma-separated "
                        "(default 0.5,0.8,0.95)")
    p.add_argument("--n-train", type=int, default=480, help="training images per run (default 480)")
    p.add_argument("--marker", choices=MARKERS, default="box",
                   help="box: a bright outline (the datasets' default marker); digit: one fixed image of a "
                        "distractor digit (digits-patch only)")
    add_common_arguments(p, "epochs of joint training / of the experts phase (paper: 150)")


def marker_tile(data: str, marker: str) -> Optional[np.ndarray]:
    """None for the dataset's default marker (box outline / extra orthonormal pattern), or a
    (1, 8, 8) image of digit 9 -- a distractor digit for the default classes (0, 1)."""
    if marker not in MARKERS:
        raise ValueError(f"unknown marker {marker!r}; expected one of {MARKERS}")
    if marker == "box":
        return None
    if data != "digits-patch":
        raise ValueError("--marker digit needs --data digits-patch")
    from ..data import load_sklearn_digits

    images, labels = load_sklearn_digits()
    return np.array(images[labels == 9][0][None])


def _with_marker_as_signal(test):
    """The test set with signal_index pointing at the marker tile (-1 where there is none), so
    pmoe.train's `capture_any` measures how often the marker is routed."""
    sig = torch.where(test.extras["spurious"], torch.tensor(MARKER_POSITION), torch.tensor(-1))
    return type(test)(test.x, test.y, sig, test.patch_size, test.num_classes, dict(test.extras))


def spurious(data: str = "digits-patch", rates: Sequence[float] = (0.5, 0.8, 0.95), n_train: int = 480,
             seeds: int = 3, seed: int = 0, epochs: int = 150, router_epochs: int = 100, lr: float = 0.2,
             batch_size: int = 20, n_test: int = 1000, models: Sequence[str] = tuple(MODEL_SPECS),
             marker: str = "box", progress: bool = True) -> dict:
    """Run the experiment; returns the results dict of the module docstring (writes nothing)."""
    from ..data import Spurious, make_dataset
    from ..train import evaluate

    if data not in DATA:
        raise ValueError(f"unknown data {data!r}; expected one of {DATA}")
    for name, v in (("--n-train", n_train), ("--n-test", n_test), ("--seeds", seeds), ("--epochs", epochs)):
        positive_int(name, v)
    if n_train % 2:
        raise ValueError(f"--n-train must be even (exactly balanced classes), got {n_train}")
    if not rates or not all(0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"rates must lie in [0, 1], got {list(rates)}")
    tile = marker_tile(data, marker)
    start = time.perf_counter()
    accuracy = {key: {t: [[] for _ in rates] for t in TEST_SETS} for key in models}
    routing = {key: {"capture_any": [[] for _ in rates], "marker_routed": [[] for _ in rates]}
               for key in models if MODEL_SPECS[key][0] == "pmoe"}
    bar = progress_bar(len(rates) * seeds * len(models), "spurious", progress)
    for i, rate in enumerate(rates):
        for r in range(seeds):
            data_seed = seed * 1000 + r  # a fresh draw of digits (and test set) per repetition
            tests = {}
            # one seed: every call draws the same training set; "independent" and "reversed" share
            # their images except the marker tile; "clean" is drawn without the marker's reserved
            # position, so its class digit may also sit at patch 0
            for name, test_rate in TEST_SETS.items():
                test_spur = None if test_rate is None else Spurious(test_rate, MARKER_POSITION, tile)
                train, tests[name] = make_dataset(data, n_train, n_test, data_seed,
                                                  spurious=Spurious(rate, MARKER_POSITION, tile),
                                                  test_spurious=test_spur)
            for key in models:
                bar.set_postfix_str(f"rate={rate} rep={r} {key}")
                model, history = train_paper_model(key, train, tests["reversed"], data_seed, epochs, router_epochs,
                                                   lr, batch_size)
                accs = {name: evaluate(model, t)["test_acc"] for name, t in tests.items()}
                for name, acc in accs.items():
                    accuracy[key][name][i].append(acc)
                line = f"rate {rate:<5} rep {r} {key:<13} " + "  ".join(f"{n} {100 * a:5.1f}%" for n, a in accs.items())
                if key in routing:
                    cap = history[-1]["capture_any"]
                    marked = evaluate(model, _with_marker_as_signal(tests["reversed"]))["capture_any"]
                    routing[key]["capture_any"][i].append(cap)
                    routing[key]["marker_routed"][i].append(marked)
                    line += f"  digit routed {cap:.2f}  marker routed {marked:.2f}"
                tqdm.write(line)
                bar.update()
    bar.close()
    summary = {key: {t: {"mean": [mean_std(a)[0] for a in per_test], "std": [mean_std(a)[1] for a in per_test]}
                     for t, per_test in acc.items()} for key, acc in accuracy.items()}
    return {
        "rates": list(rates),
        "test_sets": dict(TEST_SETS),
        "accuracy": accuracy,
        "routing": routing,
        "summary": summary,
        "config": {"data": data, "n_train": n_train, "n_test": n_test, "seeds": seeds, "seed": seed,
                   "epochs": epochs, "router_epochs": router_epochs, "lr": lr, "batch_size": batch_size,
                   "models": list(models), "marker": marker, "marker_position": MARKER_POSITION,
                   "wall_seconds": round(time.perf_counter() - start, 1), **environment()},
    }


def plot(results: dict, path: str) -> None:
    """Two panels (independent / reversed test marker): mean +- std test accuracy against the
    training correlation rate, one line per model."""
    fig = new_figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    rates = results["rates"]
    for ax, name in zip(axes, ("independent", "reversed")):
        for key, s in results["summary"].items():
            ax.errorbar(rates, [100 * m for m in s[name]["mean"]], [100 * v for v in s[name]["std"]], marker="o",
                        capsize=3, label=key, color=COLORS.get(key))
        ax.set_xlabel("training P(marker | label 1) = P(no marker | label 0)")
        ax.set_title(f"test marker {name}" + (" of the label" if name == "independent" else
                                              " (on label-0 images only)"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xticks(rates)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(loc="lower left")
    cfg = results["config"]
    fig.suptitle(f"{cfg['data']}, {cfg['marker']} marker at patch {cfg['marker_position']}: N={cfg['n_train']}, "
                 f"{cfg['seeds']} seeds, {cfg['epochs']} epochs", fontsize=10)
    save_figure(fig, path)


def summary_table(results: dict) -> str:
    rates = results["rates"]
    lines = ["| model | test set | " + " | ".join(f"rate {r}" for r in rates) + " |",
             "|---|---|" + "---|" * len(rates)]
    for key, per_test in results["summary"].items():
        for name, s in per_test.items():
            cells = [f"{100 * m:.1f} ± {100 * v:.1f}" for m, v in zip(s["mean"], s["std"])]
            lines.append(f"| {key} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    prepare_out_dir(args.out)
    results = spurious(args.data, args.rates, args.n_train, args.seeds, args.seed, args.epochs, args.router_epochs,
                       args.lr, args.batch_size, args.n_test, args.models, args.marker, not args.no_progress)
    write_json(os.path.join(args.out, "results.json"), results)
    plot(results, os.path.join(args.out, "spurious.png"))
    print(summary_table(results))
    print(f"wrote {os.path.join(args.out, 'results.json')} and spurious.png "
          f"({results['config']['wall_seconds']:.0f} s)")
    return 0
