"""Command line: `pmoe <command> ...` (or `python -m pmoe <command> ...`).

    pmoe train --data digits-patch --model pmoe --training joint      # the paper's joint recipe
    pmoe train --data digits-patch --model pmoe --training separate
    pmoe train --data digits-patch --model cnn
    pmoe train --data cifar10 --data-dir ~/data --model wrn-pmoe

Subcommands are registered in COMMANDS; a subcommand's module is imported only when it runs.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

# (name, help, "module:add_arguments(parser)", "module:run(args) -> int").  Register experiment
# subcommands from pmoe/experiments/ here, one line each.
COMMANDS: list[tuple[str, str, str, str]] = [
    ("train", "train one model on one dataset", "pmoe.cli:add_train_arguments", "pmoe.cli:run_train"),
    ("sample-complexity", "test accuracy vs training-set size: CNN, pMoE joint, pMoE separate",
     "pmoe.experiments.sample_complexity:add_arguments", "pmoe.experiments.sample_complexity:run"),
    ("show-routing", "draw the patches each expert of a trained pMoE picks, with their gates",
     "pmoe.experiments.show_routing:add_arguments", "pmoe.experiments.show_routing:run"),
    ("spurious", "a marker tile correlated with one class in training only: CNN vs pMoE test accuracy",
     "pmoe.experiments.spurious:add_arguments", "pmoe.experiments.spurious:run"),
    ("equal-compute", "flagship pMoE vs its dense twin: test accuracy next to counted FLOPs",
     "pmoe.experiments.equal_compute:add_arguments", "pmoe.experiments.equal_compute:run"),
]

DATA_CHOICES = ("digits-patch", "synthetic", "mnist-patch", "cifar10", "cifar10-patch")
FILE_DATA = ("mnist-patch", "cifar10", "cifar10-patch")


def _resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# ----------------------------------------------------------------------------- pmoe train

def _top_l(text: str):
    """An int count ("6") or a float fraction of the patches ("0.375")."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--top-l must be an int count or a fraction, got {text!r}") from None


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATA_CHOICES, default="digits-patch")
    p.add_argument("--model", choices=("pmoe", "cnn", "wrn", "wrn-pmoe"), default="pmoe")
    p.add_argument("--training", choices=("joint", "separate"), default="joint",
                   help="joint: every parameter by SGD; separate: routers first, then experts (pmoe, k=2)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default 1000; cifar10: all)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default 1000; cifar10: all)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (separate training: of the experts phase); default 20 joint, 150 separate, 50 wrn")
    p.add_argument("--router-epochs", type=int, default=100, help="separate training: epochs of the router phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default runs/<data>-<model>-<training>-s<seed>)")
    p.add_argument("--data-dir", default=None, help="directory holding MNIST/ or cifar-10-batches-py/")
    p.add_argument("--data-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset argument, e.g. noise=0.2, classes=(3,8) (repeatable)")
    p.add_argument("--lr", type=float, default=None, help="default 0.2 (wrn: 0.1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 20 (wrn: 128)")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--experts", type=int, default=None, help="k (pmoe, wrn-pmoe)")
    p.add_argument("--top-l", type=_top_l, default=None, help="l, a count or a fraction of n (pmoe, wrn-pmoe)")
    p.add_argument("--neurons", type=int, default=None, help="neurons per expert (pmoe) or in all (cnn)")
    p.add_argument("--head", choices=("sign", "gaussian"), default=None, help="fixed second layer (pmoe, cnn)")
    p.add_argument("--depth", type=int, default=None, help="Wide-ResNet depth (default 16)")
    p.add_argument("--widen", type=int, default=None, help="Wide-ResNet widening factor (default 4)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every this many epochs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 for pmoe/cnn, whose tiny ops lose to threading "
                        "overhead, torch's default for the Wide-ResNets)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from this checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_overrides(args: argparse.Namespace) -> dict:
    """CLI flags -> build_model overrides; a flag the model has no use for is an error."""
    names = {
        "pmoe": {"experts": "num_experts", "top_l": "top_l", "neurons": "neurons_per_expert", "head": "head"},
        "cnn": {"neurons": "neurons", "head": "head"},
        "wrn": {"depth": "depth", "widen": "widen_factor"},
        "wrn-pmoe": {"depth": "depth", "widen": "widen_factor", "experts": "num_experts", "top_l": "top_l"},
    }[args.model]
    out = {}
    for flag in ("experts", "top_l", "neurons", "head", "depth", "widen"):
        value = getattr(args, flag)
        if value is None:
            continue
        if flag not in names:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --model {args.model}")
        out[names[flag]] = value
    return out


def _train_config(args: argparse.Namespace, out_dir: str, meta: dict):
    from .train import TrainConfig

    wrn = args.model.startswith("wrn")
    epochs = args.epochs if args.epochs is not None else (50 if wrn else 150 if args.training == "separate" else 20)
    return TrainConfig(
        epochs=epochs,
        lr=args.lr if args.lr is not None else (0.1 if wrn else 0.2),
        batch_size=args.batch_size if args.batch_size is not None else (128 if wrn else 20),
        momentum=args.momentum,
        router_epochs=args.router_epochs,
        seed=args.seed,
        eval_every=args.eval_every,
        progress=not args.no_progress,
        device=args.device,
        checkpoint=os.path.join(out_dir, "checkpoint.pt"),
        resume=args.resume,
        meta=meta,
    )


def run_train(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    import torch
    from tqdm.auto import tqdm

    from .data import make_dataset
    from .models import build_model
    from .train import format_record, load_checkpoint, seed_everything, train_model

    threads = args.threads if args.threads is not None else (None if args.model.startswith("wrn") else 1)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)

    data_kw = dict(args.data_arg)
    if args.data in FILE_DATA:
        data_kw["data_dir"] = args.data_dir
    elif args.data_dir is not None:
        raise ValueError(f"--data-dir is for {FILE_DATA}; {args.data} is generated offline")
    full = args.data == "cifar10"
    n_train = args.n_train if args.n_train is not None else (None if full else 1000)
    n_test = args.n_test if args.n_test is not None else (None if full else 1000)
    overrides = _model_overrides(args)
    out_dir = args.out or os.path.join("runs", f"{args.data}-{args.model}-{args.training}-s{args.seed}")
    meta = {"data": args.data, "n_train": n_train, "n_test": n_test, "data_args": {k: repr(v) for k, v in args.data_arg},
            "model": args.model, "model_args": {k: repr(v) for k, v in overrides.items()}, "training": args.training}
    if args.resume:
        saved = load_checkpoint(args.resume)["config"]["meta"]
        different = {k for k in meta if saved.get(k) != meta[k]}
        if different:
            raise ValueError(f"checkpoint {args.resume} was trained with different settings: "
                             + ", ".join(f"{k}={saved.get(k)!r} (now {meta[k]!r})" for k in sorted(different)))

    seed_everything(args.seed)
    train, test = make_dataset(args.data, n_train, n_test, args.seed, **data_kw)
    model = build_model(args.model, train.in_channels, train.patch_size, train.num_classes, args.training, **overrides)
    cfg = _train_config(args, out_dir, meta)
    os.makedirs(out_dir, exist_ok=True)
    print(f"pmoe train: {args.data} ({len(train)} train / {len(test)} test, {train.num_patches} patches of "
          f"{train.in_channels}x{train.patch_size}x{train.patch_size}), model {args.model}, {args.training} "
          f"training, seed {args.seed}, out {out_dir}", flush=True)
    history = train_model(model, train, test, cfg, args.training, log=lambda rec: tqdm.write(format_record(rec)))
    final = history[-1]
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump({"config": meta, "history": history}, f, indent=1)
    print(f"final test accuracy: {100 * final['test_acc']:.2f}%  ({time.perf_counter() - start:.1f} s; "
          f"checkpoint {cfg.checkpoint})", flush=True)
    return 0


# ----------------------------------------------------------------------------- entry point

def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are added (its module is imported for that)."""
    parser = argparse.ArgumentParser(prog="pmoe", description="patch-level routed Mixture-of-Experts")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_run=run)
        if name == command:
            _resolve(add_arguments)(sp)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse argv (default sys.argv[1:]) and run the subcommand; returns the exit status
    (2 with a message on stderr for bad arguments or missing files)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(_resolve(args._run)(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"pmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
