"""Train the flagship pMoE network and its dense twin with the same recipe on the same offline
data; report time per training step and the wall time and steps to reach a fixed test accuracy.

    python bench/train_time.py                       # digits-patch (1x32x32), both networks
    python bench/train_time.py --json                # the same as JSON rows
    python bench/train_time.py --target 0.95 --max-steps 800 --batch 64
    python bench/train_time.py --channels-last       # both networks and the data channels-last
    python bench/train_time.py --compile             # both networks under torch.compile

Data: pmoe.data's "digits-patch" (sklearn's 8x8 digits as a 4x4 tile grid, one class tile, the
others distractors) when pmoe.data is importable, else a synthetic tensor dataset made here
(same layout: one class tile among 15 noise tiles); the output says which.
Backend: PMoEConv2d(backend="auto"): the torch path on CPU, the fused kernels on CUDA.
Timing: the two networks train side by side, one step of each in turn (the order alternating),
so that both see the same machine load; each step ends in a synchronize on CUDA.  `step ms` is
the median after the warm-up steps; the step-time ratio is the median over the steps both took
(after the warm-up) of pMoE's step over the dense twin's; `train s to target` counts training
steps only (the periodic test evaluations are excluded), until the first evaluation at or above
the target accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from allocator import keep_freed_memory  # noqa: E402
from omp_wait import choose_omp_wait  # noqa: E402

choose_omp_wait()  # before torch starts its OpenMP runtime (see bench/omp_wait.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import machine_line  # noqa: E402

from pmoe.models.flagship import DEFAULT_WIDTHS, FlagshipDense, FlagshipPMoE  # noqa: E402


def synthetic_digits(n_train: int, n_test: int, seed: int):
    """Fallback data: 32x32 images, 4x4 grid of 8x8 tiles; one tile (random cell) carries one of
    two fixed class patterns plus noise, the others noise patterns.  Labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(2, 8, 8, generator=g).round()

    def draw(n):
        y = torch.randint(0, 2, (n,), generator=g)
        tiles = torch.rand(n, 16, 8, 8, generator=g) * 0.5
        cell = torch.randint(0, 16, (n,), generator=g)
        tiles[torch.arange(n), cell] = patterns[y] + 0.2 * torch.randn(n, 8, 8, generator=g)
        x = tiles.view(n, 4, 4, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, 1, 32, 32)
        return x, y

    return (*draw(n_train), *draw(n_test))


def load_data(n_train: int, n_test: int, seed: int):
    """(x_train, y_train, x_test, y_test, description)."""
    try:
        from pmoe.data import make_dataset
        train, test = make_dataset("digits-patch", n_train, n_test, seed=seed)
        return train.x.float(), train.y.long(), test.x.float(), test.y.long(), "pmoe.data digits-patch"
    except Exception as exc:  # the data package is optional for this benchmark
        print(f"# pmoe.data unavailable ({type(exc).__name__}: {exc}); using synthetic tiles", file=sys.stderr)
        return (*synthetic_digits(n_train, n_test, seed), "synthetic tiles (generated in train_time.py)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    net.eval()
    correct = sum((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    net.train()
    return correct / len(x)


def compiled(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, backend: str = "inductor") -> torch.nn.Module:
    """torch.compile(net), its training graph compiled on (x, y) before any step is timed, and net
    left as it was (the warm-up's gradients dropped, batch-norm statistics put back), so that the
    compile is in neither the step times nor the time to target (the evaluation graph compiles in
    the first, untimed, accuracy())."""
    fast = torch.compile(net, backend=backend, fullgraph=True, dynamic=False)  # a graph break raises
    state = {k: v.clone() for k, v in net.state_dict().items()}
    F.cross_entropy(fast(x), y).backward()
    net.zero_grad(set_to_none=True)
    net.load_state_dict(state)
    return fast


def training(net, data, device, *, batch: int, lr: float, max_steps: int, eval_every: int, target: float,
             warmup: int, seed: int, max_seconds: float = float("inf"), channels_last: bool = False,
             compile_net: bool = False):
    """One network's training, a step at a time: a generator that yields each step's seconds and
    returns the result dict when it stops (at the target accuracy, max_steps or max_seconds).

    SGD (momentum 0.9, weight decay 5e-4, constant lr), cross-entropy, reshuffled epochs drawn
    from one seeded generator: the same batches for every network.  channels_last: the network's
    parameters and the images in torch.channels_last (the pMoE layer's native layout).  compile_net:
    the network under torch.compile (compiled before the first step: compiled())."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xtr, ytr, xte, yte = (t.to(device) for t in data)
    xtr, xte = xtr.contiguous(memory_format=fmt), xte.contiguous(memory_format=fmt)
    net = net.to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    if compile_net:
        net = compiled(net, xtr[:batch], ytr[:batch])
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(xtr), generator=gen), 0
    step_s, train_s, reached = [], 0.0, None
    acc = accuracy(net, xte, yte)
    for step in range(1, max_steps + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = order[pos:pos + batch].to(device)
        pos += batch
        _sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        dt = time.perf_counter() - t0
        step_s.append(dt)
        train_s += dt
        yield dt
        if step % eval_every == 0 or step == max_steps:
            acc = accuracy(net, xte, yte)
            if reached is None and acc >= target:
                reached = (step, train_s)
                break
        if train_s > max_seconds:
            break
    steady = step_s[warmup:] or step_s
    return {
        "step_ms": 1e3 * statistics.median(steady),
        "steps_to_target": reached[0] if reached else None,
        "train_s_to_target": reached[1] if reached else None,
        "steps_run": len(step_s),
        "train_s_total": train_s,
        "final_test_acc": acc,
    }


def train(net, data, device, **kwargs) -> dict:
    """training() run to its end alone: -> its result dict."""
    return interleaved({"net": training(net, data, device, **kwargs)}, warmup=0)[0]["net"]


def interleaved(runs: dict, warmup: int) -> tuple[dict, list]:
    """Step every training generator in turn, one step each, the order alternating from round to
    round, until all have stopped: the networks train side by side, so that their step times see
    the same machine load.  -> ({name: result dict}, [(name, seconds) ...] for every round in which
    all of them stepped, after the first `warmup` rounds)."""
    results, rounds, names = {}, [], list(runs)
    while len(results) < len(runs):
        step = {}
        for name in (names if len(rounds) % 2 == 0 else names[::-1]):
            if name in results:
                continue
            try:
                step[name] = next(runs[name])
            except StopIteration as stop:
                results[name] = stop.value
        rounds.append(step)
    paired = [r for r in rounds[warmup:] if len(r) == len(runs)]
    return results, paired


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.97, help="test accuracy to reach (default 0.97)")
    ap.add_argument("--max-steps", type=int, default=1500, help="give up after this many steps per network")
    ap.add_argument("--max-seconds", type=float, default=200,
                    help="give up after this much training time per network (keeps the script under 10 min)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between test evaluations")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the per-step median")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS),
                    help="flagship widths (stem, stages; default %(default)s)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is steadier "
                    "on a shared machine, where OpenMP threads stall waiting for each other)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--channels-last", action="store_true",
                    help="run both networks and the data in torch.channels_last instead of NCHW")
    ap.add_argument("--compile", action="store_true",
                    help="both networks under torch.compile (inductor), compiled before the first timed step")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    freed = keep_freed_memory()  # see bench/allocator.py

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    *data, source = load_data(args.n_train, args.n_test, args.seed)
    runs = {}
    for name, cls in (("flagship-pmoe", FlagshipPMoE), ("flagship-dense", FlagshipDense)):
        torch.manual_seed(args.seed)
        net = cls(in_channels=1, num_classes=2, widths=args.widths)
        runs[name] = training(net, data, device, batch=args.batch, lr=args.lr, max_steps=args.max_steps,
                              eval_every=args.eval_every, target=args.target, warmup=args.warmup, seed=args.seed,
                              max_seconds=args.max_seconds, channels_last=args.channels_last,
                              compile_net=args.compile)
    results, paired = interleaved(runs, args.warmup)
    ratio = statistics.median(r["flagship-pmoe"] / r["flagship-dense"] for r in paired) if paired else None
    rows = [{"name": name, "data": source, "device": str(device), "batch": args.batch,
             "memory_format": "channels_last" if args.channels_last else "nchw", "compiled": args.compile,
             "target_acc": args.target,
             "threads": torch.get_num_threads(), "loadavg_1min": round(os.getloadavg()[0], 2),
             "paired_steps": len(paired), "paired_step_ratio": ratio, **results[name]} for name in runs]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(machine_line(device))
    print(f"# OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} (bench/omp_wait.py); freed memory: "
          f"{freed} (bench/allocator.py); 1-min load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# data: {source}, {args.n_train} train / {args.n_test} test; SGD lr {args.lr} momentum 0.9, "
          f"batch {args.batch}, target test accuracy {args.target}, "
          f"{'channels-last' if args.channels_last else 'NCHW'}{', torch.compile' if args.compile else ''}")
    print("| network | step ms (median) | steps to target | train s to target | final acc | steps run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, f: "not reached" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['name']} | {r['step_ms']:.2f} | {fmt(r['steps_to_target'], 'd')} | "
              f"{fmt(r['train_s_to_target'], '.2f')} | {r['final_test_acc']:.3f} | {r['steps_run']} |")
    p, d = rows
    if p["paired_step_ratio"] is not None:
        print(f"# pMoE / dense: step time {p['paired_step_ratio']:.2f}x (median over {p['paired_steps']} "
              f"steps taken side by side; medians' ratio {p['step_ms'] / d['step_ms']:.2f}x)", end="")
    else:
        print(f"# pMoE / dense: step time {p['step_ms'] / d['step_ms']:.2f}x", end="")
    if p["train_s_to_target"] and d["train_s_to_target"]:
        print(f", wall time to target {p['train_s_to_target'] / d['train_s_to_target']:.2f}x", end="")
    print(" (>1 means pMoE is slower on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
