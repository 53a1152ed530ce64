"""Accuracy at equal compute savings: the flagship pMoE network against its dense twin
(`pmoe.models.flagship`), trained with one recipe on one offline task, each test accuracy next to
its counted FLOPs.  A FLOP saving counts only where pMoE is as accurate: at most 1 point below
the dense twin (mean over repetitions).

    pmoe equal-compute --out runs/equal-compute                  # digits-patch, classes 3 vs 5

Task: digits-patch scaled up -- the 1x32x32 digit-tile images of `pmoe.data` (so the FLOPs equal
bench/compute_savings.py's flagship-digits row), with a harder digit pair than the paper's 0 vs 1
(default 3 vs 5, where neither network saturates) and more training images.
Recipe (both networks, same minibatches): SGD, momentum 0.9, weight decay 5e-4, batch 64,
learning rate 0.05 annealed to 0 by a cosine over all steps (a stable final accuracy, which a
constant rate does not give), cross-entropy.
FLOPs: `pmoe.experiments.flops.model_flops` (FlopCounterMode around the real forward, and
forward + backward) on one training batch, divided by the batch size; BN and ReLU are not
counted (torch counts no FLOPs for them), as in bench/compute_savings.py.

Output: DIR/results.json
    networks: {name: {"test_acc": [per repetition], "test_acc_mean", "infer_flops", "train_flops"
                      (per image), "train_seconds": [...], "curve": [[test acc per epoch] per repetition]}}
    ratio: {"infer", "train"}: pMoE / dense FLOPs; accuracy_gap: pMoE - dense (mean);
    same_accuracy: gap >= -0.01; savings: {"infer", "train"}: 1 - ratio if same_accuracy else None
    config: {...}
and DIR/equal_compute.png: test accuracy against cumulative counted training FLOPs per image.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (COLORS, bounded_float, digit_pair, environment, mean_std, new_figure, positive_float,
                     positive_int, prepare_out_dir, progress_bar, save_figure, write_json)
from .flops import model_flops

NETWORKS = ("flagship-pmoe", "flagship-dense")
TOLERANCE = 0.01  # "the same accuracy": pMoE at most 1 point below the dense twin


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=digit_pair, default=[3, 5], help="the two class digits (default 3,5)")
    p.add_argument("--n-train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--n-test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per network (default 12)")
    p.add_argument("--seeds", type=int, default=5, help="repetitions (default 5: one seed moves pMoE by several points)")
    p.add_argument("--seed", type=int, default=0, help="base seed (data and initialisation)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--top-l", type=bounded_float(0.0, 1.0, low_open=True), default=0.25,
                   help="fraction of the patches each expert takes in every pMoE stage (default 0.25, the flagship's)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch, both networks (default 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy 2-core machine a second thread stalls the other)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stdout or stderr is not a terminal; "
                        "a line per epoch is printed either way)")


def per_image_flops(net: torch.nn.Module, x: torch.Tensor) -> dict:
    """Counted inference and training (forward + backward) FLOPs per image, on the batch x."""
    y = torch.arange(len(x)) % 2
    flops = model_flops(net, x, lambda logits: F.cross_entropy(logits, y))
    return {k: v / len(x) for k, v in flops.items()}


def train_network(net: torch.nn.Module, train, test, epochs: int, lr: float, batch_size: int, seed: int,
                  on_epoch=None) -> dict:
    """The recipe of the module docstring; returns final test_acc, the per-epoch curve and the
    training wall time (evaluations excluded).  on_epoch(epoch, test_acc): called after every
    epoch (epoch counts from 1)."""
    from ..train import classification_loss, evaluate

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)  # the same minibatches for both networks
    curve, seconds = [], 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            idx = perm[i:i + batch_size]
            loss = classification_loss(net(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        seconds += time.perf_counter() - t0
        curve.append(evaluate(net, test)["test_acc"])
        if on_epoch is not None:
            on_epoch(len(curve), curve[-1])
    return {"test_acc": curve[-1], "curve": curve, "train_seconds": seconds}


def _epoch_logger(bar, prefix: str, epochs: int):
    """on_epoch for train_network: a plain line per epoch (progress in a log too), and a bar step."""
    def on_epoch(epoch: int, test_acc: float) -> None:
        tqdm.write(f"{prefix} epoch {epoch:>3}/{epochs}  test {100 * test_acc:5.1f}%")
        bar.update()

    return on_epoch


def equal_compute(classes: Sequence[int] = (3, 5), n_train: int = 2000, n_test: int = 1000, epochs: int = 12,
                  seeds: int = 5, seed: int = 0, lr: float = 0.05, batch_size: int = 64, top_l: float = 0.25,
                  progress: bool = True) -> dict:
    """Run the experiment; returns the results dict of the module docstring (writes nothing)."""
    from ..data import make_dataset
    from ..models.flagship import FlagshipDense, FlagshipPMoE
    from ..train import seed_everything

    for name, v in (("--n-train", n_train), ("--n-test", n_test), ("--epochs", epochs), ("--seeds", seeds),
                    ("--batch-size", batch_size)):
        positive_int(name, v)
    if len(classes) != 2:
        raise ValueError(f"--classes must name two digits, got {list(classes)}")
    start = time.perf_counter()
    nets = {name: {"test_acc": [], "curve": [], "train_seconds": []} for name in NETWORKS}
    bar = progress_bar(seeds * len(NETWORKS) * epochs, "equal-compute", progress)
    for r in range(seeds):
        run_seed = seed * 1000 + r
        train, test = make_dataset("digits-patch", n_train, n_test, run_seed, classes=tuple(classes))
        for name, cls in zip(NETWORKS, (FlagshipPMoE, FlagshipDense)):
            seed_everything(run_seed)  # both networks start from the same RNG state
            net = cls(in_channels=train.in_channels, num_classes=train.num_classes, top_l=top_l)
            if r == 0:  # on a copy: a counted training step would move the BN statistics
                nets[name].update(per_image_flops(copy.deepcopy(net), train.x[:batch_size]))
            bar.set_postfix_str(f"rep={r} {name}")
            res = train_network(net, train, test, epochs, lr, batch_size, run_seed,
                                on_epoch=_epoch_logger(bar, f"rep {r} {name:<15}", epochs))
            for key in ("test_acc", "curve", "train_seconds"):
                nets[name][key].append(res[key])
            tqdm.write(f"rep {r} {name:<15} test {100 * res['test_acc']:5.1f}%  "
                       f"({res['train_seconds']:.0f} s training)")
    bar.close()
    for s in nets.values():
        s["test_acc_mean"], s["test_acc_std"] = mean_std(s["test_acc"])
    p, d = nets["flagship-pmoe"], nets["flagship-dense"]
    ratio = {"infer": p["infer_flops"] / d["infer_flops"], "train": p["train_flops"] / d["train_flops"]}
    gap = p["test_acc_mean"] - d["test_acc_mean"]
    same = gap >= -TOLERANCE
    return {
        "networks": nets,
        "ratio": ratio,
        "accuracy_gap": gap,
        "same_accuracy": same,
        "savings": {k: (1.0 - v if same else None) for k, v in ratio.items()},
        "config": {"data": "digits-patch", "classes": list(classes), "n_train": n_train, "n_test": n_test,
                   "epochs": epochs, "seeds": seeds, "seed": seed, "lr": lr, "batch_size": batch_size, "top_l": top_l,
                   "recipe": "SGD momentum 0.9, weight decay 5e-4, cosine lr to 0, cross-entropy",
                   "tolerance": TOLERANCE, "wall_seconds": round(time.perf_counter() - start, 1), **environment()},
    }


def plot(results: dict, path: str) -> None:
    """Test accuracy (mean over repetitions) against cumulative counted training FLOPs per image."""
    fig = new_figure()
    ax = fig.add_subplot()
    n_train = results["config"]["n_train"]
    for name, s in results["networks"].items():
        epochs = len(s["curve"][0])
        x = [s["train_flops"] * n_train * (e + 1) / 1e9 for e in range(epochs)]
        y = [100 * sum(c[e] for c in s["curve"]) / len(s["curve"]) for e in range(epochs)]
        ax.plot(x, y, marker="o", ms=3, color=COLORS.get(name),
                label=f"{name}: {100 * s['test_acc_mean']:.1f}%, {s['infer_flops'] / 1e6:.2f} MFLOP/img inference")
    verdict = ("savings count" if results["same_accuracy"] else "savings do not count")
    cfg = results["config"]
    ax.set_title(f"digits-patch {cfg['classes'][0]} vs {cfg['classes'][1]}, N={n_train}, {cfg['seeds']} seeds: "
                 f"pMoE/dense FLOPs inference {results['ratio']['infer']:.2f}, training "
                 f"{results['ratio']['train']:.2f}\naccuracy gap {100 * results['accuracy_gap']:+.1f} points "
                 f"({verdict} at a 1-point tolerance)", fontsize=9)
    ax.set_xlim(left=0)
    ax.set_xlabel("cumulative training GFLOPs (counted, whole training set)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def summary(results: dict) -> str:
    lines = ["| network | test accuracy (%) | inference MFLOP/img | training MFLOP/img | training s |",
             "|---|---|---|---|---|"]
    for name, s in results["networks"].items():
        lines.append(f"| {name} | {100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f} | "
                     f"{s['infer_flops'] / 1e6:.2f} | {s['train_flops'] / 1e6:.2f} | "
                     f"{sum(s['train_seconds']) / len(s['train_seconds']):.0f} |")
    r, sv = results["ratio"], results["savings"]
    lines.append(f"pMoE/dense FLOPs: inference {r['infer']:.3f}, training {r['train']:.3f}; accuracy gap "
                 f"{100 * results['accuracy_gap']:+.1f} points -> " +
                 (f"savings count: inference {100 * sv['infer']:.0f}%, training {100 * sv['train']:.0f}%"
                  if results["same_accuracy"] else "pMoE is more than 1 point less accurate: the savings do not count"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(positive_int("--threads", args.threads))
    if not 0.0 < args.top_l <= 1.0:
        raise ValueError(f"--top-l must be a fraction in (0, 1], got {args.top_l}")
    prepare_out_dir(args.out)
    results = equal_compute(args.classes, args.n_train, args.n_test, args.epochs, args.seeds, args.seed, args.lr,
                            args.batch_size, args.top_l, not args.no_progress)
    write_json(os.path.join(args.out, "results.json"), results)
    plot(results, os.path.join(args.out, "equal_compute.png"))
    print(summary(results))
    print(f"wrote {os.path.join(args.out, 'results.json')} and equal_compute.png "
          f"({results['config']['wall_seconds']:.0f} s)")
    return 0
