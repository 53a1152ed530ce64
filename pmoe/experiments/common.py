"""Pieces every experiment shares: argument parsing, the three models of the paper's comparison,
one training run, JSON output and a headless figure.

The models are built with `pmoe.models.build_model`'s defaults (the paper's settings) and trained
with `pmoe.train`'s recipes; nothing here re-implements either.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

# name in results -> (build_model name, training recipe)
MODEL_SPECS: dict[str, tuple[str, str]] = {
    "cnn": ("cnn", "joint"),
    "pmoe-joint": ("pmoe", "joint"),
    "pmoe-separate": ("pmoe", "separate"),
}
COLORS = {"cnn": "tab:blue", "pmoe-joint": "tab:orange", "pmoe-separate": "tab:green",
          "flagship-pmoe": "tab:orange", "flagship-dense": "tab:blue"}


# ----------------------------------------------------------------------------- argument types

def int_list(text: str) -> list[int]:
    """"60,120,240" -> [60, 120, 240]: positive ints, no repeats (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct positive integers, got {text!r}")
    return values


def digit_pair(text: str) -> list[int]:
    """"3,5" -> [3, 5]: two different digits 0..9 (argparse type)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated digits, got {text!r}") from None
    if len(values) != 2 or values[0] == values[1] or not all(0 <= v <= 9 for v in values):
        raise argparse.ArgumentTypeError(f"expected two different digits in 0..9, got {text!r}")
    return values


def rate_list(text: str) -> list[float]:
    """"0.5,0.9,1" -> [0.5, 0.9, 1.0]: numbers in [0, 1] (argparse type)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {text!r}")
    return values


def bounded_float(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                  high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (an end excluded when *_open), so NaN,
    Inf and out-of-range values are refused at parse time."""
    where = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"expected a finite number in {where}, got {text!r}")
        return value

    parse.__name__ = f"number in {where}"
    return parse


positive_float = bounded_float(0.0, low_open=True)


def model_list(text: str) -> list[str]:
    """"cnn,pmoe-joint" -> ["cnn", "pmoe-joint"], each one of MODEL_SPECS (argparse type)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in MODEL_SPECS]
    if not values or bad or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct names from {tuple(MODEL_SPECS)}, got {text!r}")
    return values


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def add_common_arguments(p: argparse.ArgumentParser, epochs_help: str) -> None:
    """Flags shared by the paper-model experiments (sample-complexity, spurious)."""
    p.add_argument("--seeds", type=int, default=3, help="repetitions per setting (default 3)")
    p.add_argument("--seed", type=int, default=0, help="base seed: data and every run derive from it")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=150, help=epochs_help)
    p.add_argument("--router-epochs", type=int, default=100,
                   help="separate training: epochs of the router phase (paper: 100)")
    p.add_argument("--lr", type=positive_float, default=0.2, help="SGD learning rate (paper: 0.2)")
    p.add_argument("--batch-size", type=int, default=20, help="minibatch (paper: 20)")
    p.add_argument("--n-test", type=int, default=1000, help="held-out test images (default 1000)")
    p.add_argument("--models", type=model_list, default=list(MODEL_SPECS),
                   help=f"comma-separated subset of {','.join(MODEL_SPECS)} (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these tiny models lose to threading overhead)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def set_threads(threads: int) -> None:
    torch.set_num_threads(positive_int("--threads", threads))


# ----------------------------------------------------------------------------- training

def train_paper_model(key: str, train, test, seed: int, epochs: int, router_epochs: int, lr: float,
                      batch_size: int, eval_every: int = 0, log: Optional[Callable[[str], None]] = None,
                      **model_overrides) -> tuple[nn.Module, list]:
    """Build model `key` (one of MODEL_SPECS) with the paper's defaults and train it with its recipe.

    train / test: PatchDatasets.  seed: model init (torch's global RNG) and minibatch order.
    eval_every: evaluate on `test` every this many epochs (0: after the last only); log: gets one
    line per evaluation (pmoe.train's record line plus, for pMoE, the irrelevant-routed fraction).
    Returns (model, history); history[-1] holds the final test_acc (and routing records for pMoE).
    """
    from ..models import build_model
    from ..train import TrainConfig, format_record, seed_everything, train_model
    from .routing_metrics import discriminative_routing, routed_layer_size

    name, training = MODEL_SPECS[key]
    seed_everything(seed)
    model = build_model(name, train.in_channels, train.patch_size, train.num_classes, training, **model_overrides)
    # the router phase of separate training keeps TrainConfig's (the paper's) lr 0.2, batch 20
    cfg = TrainConfig(epochs=epochs, router_epochs=router_epochs, lr=lr, batch_size=batch_size, seed=seed,
                      eval_every=eval_every, progress=False)

    def log_record(rec: dict) -> None:
        if log is None or "test_acc" not in rec:
            return
        line = format_record(rec)
        if "capture" in rec:
            n = test.num_patches
            irrelevant = discriminative_routing(rec, n, routed_layer_size(model, n))["irrelevant_routed"]
            line += f"  irrelevant routed {irrelevant:.2f}"
        log(line)

    return model, train_model(model, train, test, cfg, training, log=log_record)


# ----------------------------------------------------------------------------- output

def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar over `total` runs; with progress=True it still stays off unless stdout and
    stderr are terminals (`pmoe.train.show_progress`), so redirected logs hold only lines."""
    from tqdm.auto import tqdm

    from ..train import show_progress

    return tqdm(total=total, desc=desc, disable=not show_progress(progress), dynamic_ncols=True)


def prepare_out_dir(path: str, option: str = "--out") -> str:
    """Create the output directory `path` now, before any work, and check that it takes files:
    ValueError when it (or a folder above it) is an existing file, OSError naming `option`
    when it cannot be created or written."""
    _no_file_above(path, option)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} is an existing file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"{option} {path}: cannot write there ({e.strerror or e})") from e
    return path


def check_out_file(path: str, option: str = "--out") -> str:
    """Check, before any work, that a file can be written at `path`: ValueError when it is a
    directory or a folder above it is a file, OSError naming `option` when its folder cannot be
    created or written."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory; give a file name (e.g. {os.path.join(path, 'routing.png')})")
    prepare_out_dir(os.path.dirname(os.path.abspath(path)), option)
    return path


def _no_file_above(path: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: {parent} is a file, not a directory")



def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default, as the paper's plots use)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def environment() -> dict:
    """What the numbers were measured on."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d")}


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def new_figure(width: float = 6.4, height: float = 4.4):
    """A matplotlib Figure rendered by Agg: no pyplot, no display, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
