"""Training recipes of the paper (SPEC §3): joint training and separate (two-phase) training.

    history = train_joint(model, train, test, TrainConfig(epochs=30))
    history = train_separate(model, train, test, TrainConfig(router_epochs=100, epochs=150))

Datasets are plain tensors (a `pmoe.data.PatchDataset`, a TensorDataset of (x, y[, signal_index])
or such a tuple); minibatches are index slices, no DataLoader, no worker processes, the torch
thread count untouched -- many small runs (sample-complexity curves) stay cheap.

Loss: a model returning (B,) logits is a binary classifier trained with the logistic loss
(binary cross-entropy on the logit, label 1 <-> +1, label 0 <-> -1); one returning (B, C) is
trained with cross-entropy.  A model whose forward takes `return_routing` gets routing
statistics in its evaluation records.

Reproducibility: minibatch order comes from a torch.Generator seeded by `cfg.seed`; a checkpoint
holds the model, the optimiser, the phase and epoch, the history and the RNG states of that
generator, torch, numpy and python, so resuming continues bit for bit where the run stopped.
Resuming checks that every setting that shapes the run matches the checkpoint's (see
RESUME_MAY_CHANGE for the few that may change, e.g. `epochs` to extend a run).

Failure: a non-finite training loss, or non-finite weights about to be saved, stop the run with a
FloatingPointError, so a checkpoint on disk is never replaced by a diverged one.  Ctrl-C raises
TrainingInterrupted, which names the last checkpoint written; a checkpoint is written whole or
not at all (a Ctrl-C during the write is held until it is done).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.files import FileFormatError
from .layers import PMoEConv2d
from .routing import Routing

History = list  # of per-epoch dicts, see _evaluate and _run_phase for the keys
Log = Callable[[dict], None]


# TrainConfig's float settings: (name, range check on a finite value, its description)
_FLOAT_SETTINGS = (
    ("lr", lambda v: v > 0, "a positive finite number"),
    ("router_lr", lambda v: v > 0, "a positive finite number"),
    ("router_scale", lambda v: v > 0, "a positive finite number"),
    ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
)


@dataclass
class TrainConfig:
    """Settings of a run; the defaults are the paper's (SGD, learning rate 0.2, batch 20).

    epochs: epochs of joint training, or of phase 2 (experts) of separate training (0: none).
    momentum: SGD momentum in [0, 1); weight_decay: >= 0.
    router_epochs / router_lr / router_batch_size / router_scale: phase 1 of separate training,
        router_scale is c in g(x) = c (<w_1, mean_j x_j> - <w_2, mean_j x_j>).
    eval_every: evaluate on the test set every this many epochs, and always after the last
        (0: after the last only).
    device: a torch device that this machine has ("cpu", "cuda", "cuda:1", ...).
    checkpoint: file written every `checkpoint_every` epochs and at the end of each phase.
    resume: a checkpoint to continue from (the model must have the same architecture, and every
        setting but those in RESUME_MAY_CHANGE must equal the checkpoint's).
    meta: anything JSON-like to store in the checkpoint beside this config (the CLI stores the
        dataset and model arguments there).
    """

    epochs: int = 30
    lr: float = 0.2
    batch_size: int = 20
    momentum: float = 0.0
    weight_decay: float = 0.0
    router_epochs: int = 100
    router_lr: float = 0.2
    router_batch_size: int = 20
    router_scale: float = 1.0
    seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = 1000
    progress: bool = True
    device: str = "cpu"
    checkpoint: Optional[str] = None
    checkpoint_every: int = 1
    resume: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "router_epochs", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        for name in ("batch_size", "router_batch_size", "eval_batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, in_range, what in _FLOAT_SETTINGS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not in_range(v):
                raise ValueError(f"{name} must be {what}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        check_device(self.device)


# Settings that may differ from the checkpoint's on resume: they change how long the run goes,
# where it runs and what it logs or writes, not the data, the model or the recipe.  (A change of
# device resumes on the other device; its arithmetic may differ in the last bits.)
RESUME_MAY_CHANGE = ("epochs", "eval_every", "eval_batch_size", "progress", "device", "checkpoint",
                     "checkpoint_every", "resume")


def check_device(device) -> torch.device:
    """`device` as a torch.device; ValueError if it is not a device name or this machine lacks it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device name (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (model init, dropout, Gaussian heads)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data and losses

def as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(x, y, signal_index or None) from a PatchDataset, a TensorDataset or a tuple of tensors.
    Labels in {-1, +1} are mapped to {0, 1}."""
    if hasattr(ds, "x") and hasattr(ds, "y"):
        x, y, sig = ds.x, ds.y, getattr(ds, "signal_index", None)
    else:
        tensors = getattr(ds, "tensors", ds)
        if not isinstance(tensors, (tuple, list)) or len(tensors) not in (2, 3):
            raise TypeError("a dataset must be a PatchDataset, a TensorDataset or a tuple (x, y[, signal_index])")
        x, y, sig = tensors[0], tensors[1], (tensors[2] if len(tensors) == 3 else None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if y.dim() != 1 or len(y) != len(x) or (sig is not None and sig.shape != y.shape):
        raise ValueError(f"need y (N,) and signal_index (N,) for x of {len(x)} samples, got "
                         f"{tuple(y.shape)} and {None if sig is None else tuple(sig.shape)}")
    if y.dtype.is_floating_point:
        if not torch.equal(y, y.round()):
            raise ValueError("labels must be integers (class ids, or -1/+1 for binary tasks)")
        y = y.long()
    if len(y) and y.min() == -1:
        if not bool(((y == -1) | (y == 1)).all()):
            raise ValueError("labels containing -1 must all be -1 or +1")
        y = (y + 1) // 2
    return x, y, sig


def classification_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logistic loss for (B,) logits with labels {0, 1}; cross-entropy for (B, C) logits."""
    if out.dim() == 1:
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype))
    return F.cross_entropy(out, y)


def predictions(out: torch.Tensor) -> torch.Tensor:
    return (out > 0).long() if out.dim() == 1 else out.argmax(1)


def _check_labels(out: torch.Tensor, y: torch.Tensor) -> None:
    classes = 2 if out.dim() == 1 else out.shape[1]
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}) for this model's output of shape "
                         f"{tuple(out.shape)}, got range [{int(y.min())}, {int(y.max())}]")


def takes_routing(model: nn.Module) -> bool:
    """Whether model.forward accepts return_routing (then it returns (output, Routing))."""
    return "return_routing" in inspect.signature(model.forward).parameters


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, ds, batch_size: int = 1000, device: str = "cpu") -> dict:
    """Test loss and accuracy; for routed models also `Routing.stats()` over the whole set and,
    where signal_index >= 0, `capture`: per expert, the fraction of images whose
    discriminative patch is among the expert's chosen patches, and `capture_any`: the fraction
    where some expert chose it."""
    x, y, sig = as_tensors(ds)
    return _evaluate(model, x.to(device), y.to(device), None if sig is None else sig.to(device), batch_size)


@torch.no_grad()
def _evaluate(model, x, y, sig, batch_size: int) -> dict:
    was_training = model.training
    model.eval()
    routed = takes_routing(model)
    loss_sum, correct, indices, gates, n_patches = 0.0, 0, [], [], None
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        if routed:
            out, routing = model(xb, return_routing=True)
            indices.append(routing.indices)
            gates.append(routing.gates)
            n_patches = routing.num_patches
        else:
            out = model(xb)
        _check_labels(out, yb)
        loss_sum += classification_loss(out, yb).item() * len(xb)
        correct += int((predictions(out) == yb).sum())
    model.train(was_training)
    rec = {"test_loss": loss_sum / max(len(x), 1), "test_acc": correct / max(len(x), 1)}
    if routed and indices:
        routing = Routing(torch.cat(indices), torch.cat(gates), n_patches)
        rec["routing"] = routing.stats()
        if sig is not None and bool((sig >= 0).any()):
            valid = sig >= 0
            hits = (routing.indices[valid] == sig[valid].view(-1, 1, 1)).any(-1)  # (B, k)
            rec["capture"] = hits.double().mean(0).tolist()
            rec["capture_any"] = hits.any(1).double().mean().item()
    return rec


def format_record(rec: dict) -> str:
    """One log line for a history record."""
    parts = [f"{rec['phase']:>7} epoch {rec['epoch']:>3}/{rec['epochs']}", f"loss {rec['train_loss']:.4f}",
             f"train {100 * rec['train_acc']:5.1f}%"]
    if "test_acc" in rec:
        parts.append(f"test {100 * rec['test_acc']:5.1f}%")
    if "router_acc" in rec:
        parts.append(f"router-acc {100 * rec['router_acc']:5.1f}%")
    if "router_align" in rec:
        parts.append("align " + " ".join(f"{a:.3f}" for a in rec["router_align"]))
    if "router_margin" in rec:
        parts.append(f"margin {rec['router_margin']:.4f}")
    if "capture" in rec:
        parts.append("capture " + " ".join(f"{c:.2f}" for c in rec["capture"]) + f" (any {rec['capture_any']:.2f})")
    if "routing" in rec:
        r = rec["routing"]
        parts.append(f"unrouted {r['unrouted_fraction']:.2f} gate-H {r['gate_entropy']:.2f}/{r['gate_entropy_uniform']:.2f}")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- checkpoints

def _rng_state(gen: torch.Generator) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"shuffle": gen.get_state(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(obj):
    return tuple(_as_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, phase: str, epoch: int,
                    history: History, gen: torch.Generator, cfg: TrainConfig) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact).  Refuses, with
    a FloatingPointError, a model holding NaN or Inf: it never replaces a good checkpoint."""
    bad = next((name for name, t in model.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise FloatingPointError(f"{phase} epoch {epoch}: {bad} holds NaN or Inf; the training diverged "
                                 f"(try a smaller learning rate) and {path} was not overwritten")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "phase": phase, "epoch": epoch,
             "history": history, "rng": _rng_state(gen), "config": asdict(cfg)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHECKPOINT_KEYS = ("model", "optimizer", "phase", "epoch", "history", "rng", "config")


def load_checkpoint(path: str) -> dict:
    """The dict save_checkpoint wrote (loaded with weights_only=True: plain tensors and numbers).
    FileNotFoundError if there is no such file; FileFormatError if it is not such a checkpoint
    (empty, truncated, another format, a bare state_dict, or a pickle weights_only refuses)."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory; give the checkpoint.pt file in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch.load's errors on a foreign file are of many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileFormatError(f"checkpoint {path} cannot be read: {reason}") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        hint = " (a bare state_dict? load it with model.load_state_dict)" if isinstance(ck, dict) else ""
        raise FileFormatError(f"{path} is not a checkpoint written by pmoe: it has no {', '.join(missing)}{hint}")
    if not isinstance(ck["config"], dict) or "seed" not in ck["config"]:
        raise FileFormatError(f"{path} is not a checkpoint written by pmoe: its config holds no seed")
    return ck


def load_weights(model: nn.Module, ck: dict, path: str) -> None:
    """model.load_state_dict(ck["model"]), with a FileFormatError naming `path` when they do not fit."""
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileFormatError(f"checkpoint {path} does not fit the model: {reason}") from e


def resume_differences(cfg: TrainConfig, saved: dict) -> list[str]:
    """"name=saved (now value)" for every setting of cfg, and every key of cfg.meta, that differs
    from the checkpoint's config `saved`; the names in RESUME_MAY_CHANGE are not compared."""
    now, diffs = asdict(cfg), []
    for name in sorted(set(now) - set(RESUME_MAY_CHANGE) - {"meta"}):
        if saved.get(name) != now[name]:
            diffs.append(f"{name}={saved.get(name)!r} (now {now[name]!r})")
    saved_meta = saved.get("meta") or {}
    for key in sorted(set(now["meta"]) | set(saved_meta)):
        if saved_meta.get(key) != now["meta"].get(key):
            diffs.append(f"{key}={saved_meta.get(key)!r} (now {now['meta'].get(key)!r})")
    return diffs


def load_resume(cfg: TrainConfig) -> dict:
    """The checkpoint cfg.resume, after checking that cfg may continue it: ValueError listing
    every setting that differs, or when cfg.epochs is below the epoch the checkpoint reached."""
    ck = load_checkpoint(cfg.resume)
    diffs = resume_differences(cfg, ck["config"])
    if diffs:
        raise ValueError(f"checkpoint {cfg.resume} was trained with different settings: {', '.join(diffs)} "
                         f"(only {', '.join(RESUME_MAY_CHANGE)} may change on resume)")
    if ck["phase"] in ("joint", "experts") and ck["epoch"] > cfg.epochs:
        raise ValueError(f"checkpoint {cfg.resume} is at {ck['phase']} epoch {ck['epoch']}: epochs={cfg.epochs} "
                         f"cannot continue it (give epochs >= {ck['epoch']})")
    return ck


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training.  checkpoint / phase / epoch: the last checkpoint written (or
    resumed from), None when there is none yet."""

    def __init__(self, checkpoint: Optional[str] = None, phase: Optional[str] = None, epoch: int = 0):
        super().__init__(checkpoint, phase, epoch)
        self.checkpoint, self.phase, self.epoch = checkpoint, phase, epoch

    def __str__(self) -> str:
        if self.checkpoint is None:
            return "interrupted; no checkpoint written yet"
        where = f"epoch {self.epoch}" if self.phase == "joint" else f"{self.phase} epoch {self.epoch}"
        return f"interrupted; last checkpoint: {self.checkpoint} ({where})"


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it: a checkpoint and the record
    of it are written together.  Only in the main thread, and only over Python's own handler."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def show_progress(requested: bool) -> bool:
    """Whether to draw a progress bar: when asked, and only while stdout and stderr are both
    terminals (a redirected log would fill with the bar's carriage returns)."""
    return bool(requested) and all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))


# ----------------------------------------------------------------------------- the loop

@dataclass
class _Run:
    """What a phase needs beyond the model: data on the device, generator, history, config."""

    cfg: TrainConfig
    x: torch.Tensor
    y: torch.Tensor
    test: tuple
    gen: torch.Generator
    history: History
    log: Optional[Log]
    resume: Optional[dict] = None
    saved: tuple = ()  # (path, phase, epoch) of the last checkpoint written or resumed from


@contextlib.contextmanager
def _interrupts_named(run: _Run):
    """Turn a Ctrl-C inside the block into a TrainingInterrupted naming run's last checkpoint."""
    try:
        yield
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted(*run.saved) from None


def _start(model: nn.Module, train, test, cfg: TrainConfig, log: Optional[Log]) -> _Run:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    x, y, _ = as_tensors(train)
    tx, ty, tsig = as_tensors(test)
    if len(x) == 0:
        raise ValueError("the training set is empty")
    dev = torch.device(cfg.device)
    model.to(dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    run = _Run(cfg, x.to(dev), y.to(dev), (tx.to(dev), ty.to(dev), None if tsig is None else tsig.to(dev)),
               gen, [], log)
    if cfg.resume:
        ck = load_resume(cfg)
        load_weights(model, ck, cfg.resume)
        _set_rng_state(ck["rng"], gen)
        run.history = list(ck["history"])
        run.resume = ck
        run.saved = (cfg.resume, ck["phase"], ck["epoch"])
    return run


def _run_phase(run: _Run, model: nn.Module, phase: str, optimizer: torch.optim.Optimizer, epochs: int,
               batch_size: int, step_loss: Callable, extra_eval: Optional[Callable[[], dict]] = None) -> None:
    """SGD epochs of one phase; step_loss(idx) -> (loss, correct count) on the minibatch idx.
    Continues from the resume checkpoint when it stopped inside this phase."""
    cfg, start = run.cfg, 0
    if run.resume is not None and run.resume["phase"] == phase:
        optimizer.load_state_dict(run.resume["optimizer"])
        start = run.resume["epoch"]
        run.resume = None  # consumed: later phases start fresh
    bar = tqdm(range(start, epochs), desc=phase, disable=not show_progress(cfg.progress), leave=False,
               dynamic_ncols=True)
    try:
        for epoch in bar:
            rec = _epoch(run, model, phase, optimizer, epoch, epochs, batch_size, step_loss)
            last = epoch + 1 == epochs
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                rec.update(_evaluate(model, *run.test, cfg.eval_batch_size))
                if extra_eval is not None:
                    rec.update(extra_eval())
            run.history.append(rec)
            if run.log is not None:
                run.log(rec)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", test=f"{rec.get('test_acc', float('nan')):.3f}")
            if cfg.checkpoint and (last or (epoch + 1) % cfg.checkpoint_every == 0):
                with _ctrl_c_held():
                    save_checkpoint(cfg.checkpoint, model, optimizer, phase, epoch + 1, run.history, run.gen, cfg)
                    run.saved = (cfg.checkpoint, phase, epoch + 1)
    finally:
        bar.close()


def _epoch(run: _Run, model: nn.Module, phase: str, optimizer: torch.optim.Optimizer, epoch: int, epochs: int,
           batch_size: int, step_loss: Callable) -> dict:
    """One SGD pass over the training set; its record.  FloatingPointError on a non-finite loss."""
    t0 = time.perf_counter()
    model.train()
    N = len(run.x)
    perm = torch.randperm(N, generator=run.gen).to(run.x.device)
    loss_sum, correct = 0.0, 0
    for i in range(0, N, batch_size):
        idx = perm[i:i + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss, hits = step_loss(idx)
        value = loss.item()
        if not math.isfinite(value):
            last = f"; last checkpoint: {run.saved[0]} ({run.saved[1]} epoch {run.saved[2]})" if run.saved else ""
            raise FloatingPointError(f"{phase} epoch {epoch + 1}, step {i // batch_size + 1}: the training loss is "
                                     f"{value}; the training diverged (try a smaller learning rate){last}")
        loss.backward()
        optimizer.step()
        loss_sum += value * len(idx)
        correct += hits
    return {"phase": phase, "epoch": epoch + 1, "epochs": epochs, "train_loss": loss_sum / N,
            "train_acc": correct / N, "seconds": time.perf_counter() - t0}


def _sgd(params, lr: float, cfg: TrainConfig) -> torch.optim.SGD:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _classification_step(model: nn.Module, run: _Run) -> Callable:
    checked = []

    def step(idx):
        out = model(run.x[idx])
        yb = run.y[idx]
        if not checked:  # once: the model's output shape tells binary from multi-class
            _check_labels(out, run.y)
            checked.append(True)
        return classification_loss(out, yb), int((predictions(out.detach()) == yb).sum())

    return step


def train_joint(model: nn.Module, train, test, cfg: Optional[TrainConfig] = None, log: Optional[Log] = None) -> History:
    """Train every trainable parameter together by SGD on the classification loss (the paper's
    joint training of a pMoE model: routers learn through the softmax gate; also how the CNN
    baseline and the Wide-ResNets are trained).

    train / test: PatchDataset, TensorDataset (x, y[, signal_index]) or tuple.  log: called
    with every epoch's record.  Returns the history: one dict per epoch with phase ("joint"),
    epoch, epochs, train_loss, train_acc, seconds and, on evaluated epochs, test_loss,
    test_acc and for routed models routing (Routing.stats()), capture, capture_any.
    """
    cfg = cfg or TrainConfig()
    run = _start(model, train, test, cfg, log)
    if run.resume is not None and run.resume["phase"] != "joint":
        raise ValueError(f"checkpoint {cfg.resume} is from phase {run.resume['phase']!r}, not joint training")
    optimizer = _sgd(model.parameters(), cfg.lr, cfg)
    with _interrupts_named(run):
        _run_phase(run, model, "joint", optimizer, cfg.epochs, cfg.batch_size, _classification_step(model, run))
    return run.history


def _moe_layer(model: nn.Module) -> PMoEConv2d:
    moe = getattr(model, "moe", None)
    if not isinstance(moe, PMoEConv2d) or not hasattr(model, "router_inputs"):
        raise TypeError("separate training needs a model with a PMoEConv2d `moe` and a `router_inputs(x)` "
                        "method (e.g. pmoe.models.PMoEClassifier)")
    if moe.num_experts != 2:
        raise ValueError(f"separate training uses one router per class: num_experts must be 2, got {moe.num_experts}")
    return moe


def train_separate(model: nn.Module, train, test, cfg: Optional[TrainConfig] = None,
                   log: Optional[Log] = None) -> History:
    """The paper's separate training (binary tasks, k = 2 experts):

    phase "router": the routers w_1, w_2 alone, as the linear model
        g(x) = c (<w_1, mean_j x_j> - <w_2, mean_j x_j>) on the loss -y g(x), y in {-1, +1}
        (cfg.router_epochs, router_lr, router_batch_size, router_scale = c);
    phase "experts": routers frozen, gate set to "indicator", every other trainable parameter
        trained on the logistic loss for cfg.epochs.
    Router 1 (expert 0) is pushed towards class +1's patches, router 2 towards class -1's:
    pair it with head="sign" (expert 0's neurons +1, expert 1's -1).

    The router loss is linear in the routers, so it has no minimum: its gradient over an epoch
    is the same every epoch (-c times the sum of y * mean_j x_j), SGD moves w_1 along that sum
    and w_2 against it at a constant rate, and the loss falls without bound as their norm grows.
    Only their direction matters for which patches they pick, and it settles within a few
    epochs.  With balanced classes that direction is the class-mean difference of mean_j x_j;
    surplus images of one class add the mean of all images, which tilts both routers towards
    the brightest patches.  So router-phase records carry, besides the loss, what tells a
    router's quality: router_acc (test accuracy of sign(g)), router_align (the cosine between
    w_1 and the training set's class-mean difference, and between w_2 and its negative: near 1
    is the paper's router, well below 1 a tilted one) and router_margin (the test mean of
    y <w_1 - w_2, mean_j x_j> / |w_1 - w_2|, a margin that does not grow with the norm).
    Returns the history of both phases; see train_joint for the other keys.
    """
    cfg = cfg or TrainConfig()
    moe = _moe_layer(model)
    run = _start(model, train, test, cfg, log)
    if run.y.max() > 1:
        raise ValueError("separate training is for binary tasks (labels {0, 1} or {-1, +1})")
    resumed_phase = run.resume["phase"] if run.resume is not None else None
    if resumed_phase not in (None, "router", "experts"):
        raise ValueError(f"checkpoint {cfg.resume} is from phase {resumed_phase!r}, not separate training")
    with _interrupts_named(run):
        if resumed_phase != "experts":
            _router_phase(run, model, moe)
        moe.gate = "indicator"
        moe.router.requires_grad_(False)
        optimizer = _sgd(model.parameters(), cfg.lr, cfg)
        _run_phase(run, model, "experts", optimizer, cfg.epochs, cfg.batch_size, _classification_step(model, run))
    return run.history


def _router_phase(run: _Run, model: nn.Module, moe: PMoEConv2d) -> None:
    """Phase 1 of train_separate: the routers alone on the loss -y g(x)."""
    cfg, (tx, ty, _) = run.cfg, run.test
    y_pm = run.y.float() * 2 - 1
    with torch.no_grad():  # the router model only sees the patch mean
        mean_x = model.router_inputs(run.x).mean(1)  # (N, d)
        mean_tx = model.router_inputs(tx).mean(1)
    labels = run.y.bool()
    delta = mean_x[labels].mean(0) - mean_x[~labels].mean(0) if 0 < int(labels.sum()) < len(labels) else None

    def g(m: torch.Tensor) -> torch.Tensor:
        return cfg.router_scale * (m @ (moe.router[0] - moe.router[1]))

    def router_step(idx):
        out = g(mean_x[idx])
        yb = y_pm[idx]
        return -(yb * out).mean(), int(((out > 0).float() * 2 - 1 == yb).sum())

    @torch.no_grad()
    def router_eval() -> dict:
        rec = {"router_acc": ((g(mean_tx) > 0).long() == ty).double().mean().item()}
        diff = moe.router[0] - moe.router[1]
        if len(ty) and float(diff.norm()) > 0:
            rec["router_margin"] = ((ty.float() * 2 - 1) * (mean_tx @ diff)).mean().item() / float(diff.norm())
        if delta is not None:
            cos = F.cosine_similarity(moe.router, torch.stack([delta, -delta]), dim=1)
            rec["router_align"] = cos.tolist()
        return rec

    optimizer = _sgd([moe.router], cfg.router_lr, cfg)
    _run_phase(run, model, "router", optimizer, cfg.router_epochs, cfg.router_batch_size, router_step, router_eval)


RECIPES: dict[str, Callable[..., History]] = {"joint": train_joint, "separate": train_separate}


def train_model(model: nn.Module, train, test, cfg: Optional[TrainConfig] = None, training: str = "joint",
                log: Optional[Log] = None) -> History:
    """train_joint or train_separate by name."""
    if training not in RECIPES:
        raise ValueError(f"unknown training {training!r}; expected one of {tuple(RECIPES)}")
    return RECIPES[training](model, train, test, cfg, log)
