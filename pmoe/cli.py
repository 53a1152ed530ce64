"""Command line: `pmoe <command> ...` (or `python -m pmoe <command> ...`).

    pmoe train --data digits-patch --model pmoe --training joint      # the paper's joint recipe
    pmoe train --data digits-patch --model pmoe --training separate
    pmoe train --data digits-patch --model cnn
    pmoe train --data cifar10 --data-dir ~/data --model wrn-pmoe

Subcommands are registered in COMMANDS; a subcommand's module is imported only when it runs.

An expected failure ends in one line on stderr that names the file or option, and an exit
status (EXIT_STATUS below); `--debug` or PMOE_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
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
    ("text-segments", "the seed's open questions: dense vs segment pMoE vs hierarchical pMoE on text", "pmoe.experiments.text_segments:add_arguments", "pmoe.experiments.text_segments:run"),
]

DATA_CHOICES = ("digits-patch", "synthetic", "mnist-patch", "cifar10", "cifar10-patch")
FILE_DATA = ("mnist-patch", "cifar10", "cifar10-patch")

EXIT_STATUS = """exit status:
  0    done
  1    the run failed: a file could not be read or written (a damaged data file or
       checkpoint, an unwritable --out), or the training diverged
  2    the command line is wrong: a bad option value, a missing input file, settings that
       differ from --resume's checkpoint, a device this machine does not have
  130  interrupted (Ctrl-C); pmoe train names its last checkpoint
--debug (or PMOE_DEBUG=1) shows the traceback instead of the one-line message."""
DEBUG_HELP = "on an error, show the traceback instead of one line (also: PMOE_DEBUG=1)"


def _resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# ----------------------------------------------------------------------------- pmoe train

def _top_l(text: str):
    """An int count >= 1 ("6") or a finite fraction of the patches in (0, 1] ("0.375")."""
    from .experiments.common import bounded_float

    wrong = argparse.ArgumentTypeError(f"expected an int count >= 1 or a fraction in (0, 1], got {text!r}")
    try:
        count = int(text)
    except ValueError:
        try:
            return bounded_float(0.0, 1.0, low_open=True)(text)
        except argparse.ArgumentTypeError:
            raise wrong from None
    if count < 1:
        raise wrong
    return count


def _key_value(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE a Python literal (a number, a tuple, ...) or else a plain string;
    a number in it must be finite."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        try:
            parsed = float(value)  # "nan", "inf": numbers, though not Python literals
        except ValueError:
            return key, value  # a plain string
    if not _all_finite(parsed):
        raise argparse.ArgumentTypeError(f"{key}: expected finite numbers, got {value!r}")
    return key, parsed


def _all_finite(value) -> bool:
    if isinstance(value, (list, tuple, set)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return not isinstance(value, (float, complex)) or math.isfinite(abs(value))


def _device(text: str) -> str:
    """A torch device this machine has (argparse type)."""
    from .train import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments.common import bounded_float, positive_float

    p.add_argument("--data", choices=DATA_CHOICES, default="digits-patch",
                   help="dataset (default digits-patch, offline); mnist-patch, cifar10 and cifar10-patch read "
                        "local files from --data-dir")
    p.add_argument("--model", choices=("pmoe", "cnn", "wrn", "wrn-pmoe"), default="pmoe",
                   help="pmoe: the paper's two-layer pMoE; cnn: its single-expert baseline; wrn / wrn-pmoe: "
                        "the Wide-ResNet without / with a pMoE layer at the end (default pmoe)")
    p.add_argument("--training", choices=("joint", "separate"), default="joint",
                   help="joint: every parameter by SGD; separate: routers first, then experts (pmoe, k=2)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default 1000; cifar10: all)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default 1000; cifar10: all)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (separate training: of the experts phase); default 20 joint, 150 separate, "
                        "50 wrn; 0 evaluates the untrained model; with --resume, more than the checkpoint's "
                        "extends the run")
    p.add_argument("--router-epochs", type=int, default=100,
                   help="separate training: epochs of the router phase (default 100, the paper's; its loss "
                        "falls without bound, judge it by the logged align and margin)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data, the initialisation and the minibatch order (default 0)")
    p.add_argument("--out", default=None, help="output directory (default runs/<data>-<model>-<training>-s<seed>)")
    p.add_argument("--data-dir", default=None, help="directory holding MNIST/ or cifar-10-batches-py/")
    p.add_argument("--data-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset argument, e.g. noise=0.2, classes=(3,8) (repeatable)")
    p.add_argument("--lr", type=positive_float, default=None, help="SGD learning rate; default 0.2 (wrn: 0.1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 20 (wrn: 128)")
    p.add_argument("--momentum", type=bounded_float(0.0, 1.0, high_open=True), default=0.0,
                   help="SGD momentum in [0, 1) (default 0, the paper's plain SGD)")
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
    p.add_argument("--device", type=_device, default="cpu",
                   help="torch device to train on: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from this checkpoint; every setting must match it except --epochs, "
                        "--eval-every, --device, --out, --threads and --no-progress")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stdout or stderr is not a terminal)")


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
    from .experiments.common import prepare_out_dir
    from .models import build_model
    from .train import format_record, load_resume, seed_everything, train_model

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
    cfg = _train_config(args, out_dir, meta)
    resumed = len(load_resume(cfg)["history"]) if cfg.resume else 0  # checked before any work
    prepare_out_dir(out_dir)

    seed_everything(args.seed)
    train, test = make_dataset(args.data, n_train, n_test, args.seed, **data_kw)
    model = build_model(args.model, train.in_channels, train.patch_size, train.num_classes, args.training, **overrides)
    print(f"pmoe train: {args.data} ({len(train)} train / {len(test)} test, {train.num_patches} patches of "
          f"{train.in_channels}x{train.patch_size}x{train.patch_size}), model {args.model}, {args.training} "
          f"training, seed {args.seed}, out {out_dir}", flush=True)
    history = train_model(model, train, test, cfg, args.training, log=lambda rec: tqdm.write(format_record(rec)))
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump({"config": meta, "history": history}, f, indent=1)
    final = _final_test_acc(history, args.training, model, test, cfg.device)
    saved = f"checkpoint {cfg.checkpoint}" if len(history) > resumed else "no epoch ran, no checkpoint written"
    print(f"final test accuracy: {100 * final:.2f}%  ({time.perf_counter() - start:.1f} s; {saved})", flush=True)
    return 0


def _final_test_acc(history: list, training: str, model, test, device: str) -> float:
    """The trained model's test accuracy: the last record's when it is of the recipe's last
    phase (which always evaluates its last epoch), else (that phase ran no epoch) evaluated now."""
    from .train import evaluate

    if history and history[-1]["phase"] == ("joint" if training == "joint" else "experts"):
        return history[-1]["test_acc"]
    return evaluate(model, test, device=device)["test_acc"]


# ----------------------------------------------------------------------------- entry point

def _version() -> str:
    from importlib import metadata

    import torch

    from . import __version__

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    return f"pmoe {__version__} (torch {torch.__version__}, triton {triton})"


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are added (its module is imported for that)."""
    parser = argparse.ArgumentParser(prog="pmoe", description="patch-level routed Mixture-of-Experts",
                                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to run; `pmoe COMMAND --help` lists its options")
    for name, help_text, add_arguments, run in COMMANDS:
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_STATUS,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(_run=run)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if name == command:
            _resolve(add_arguments)(sp)
    return parser


def describe(error: BaseException) -> str:
    """One line for an error: its message (an OSError's file and reason), lines joined."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def exit_status(error: BaseException) -> int:
    """EXIT_STATUS for an expected error: 1 for a run that failed (a file that cannot be read or
    written, a diverged training), 2 for a wrong command line (ValueError, TypeError, a missing
    input file)."""
    from .data.files import FileFormatError

    if isinstance(error, (FileFormatError, FloatingPointError)):
        return 1
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        return 1
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse argv (default sys.argv[1:]) and run the subcommand; returns the exit status
    (EXIT_STATUS), with one line on stderr for an expected failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    debug = args.debug or os.environ.get("PMOE_DEBUG", "").strip() not in ("", "0")
    try:
        return int(_resolve(args._run)(args) or 0)
    except KeyboardInterrupt as e:  # pmoe.train.TrainingInterrupted names the last checkpoint
        if debug:
            raise
        print(f"pmoe {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        if debug:
            raise
        print(f"pmoe {args.command}: error: {describe(e)}", file=sys.stderr)
        return exit_status(e)
