"""The seed's two open questions, by experiment: does patch-level routing of text *segments* save
compute and training samples as patch routing does for images, and can experts be assigned
hierarchically (paragraphs first, then sentences in them)?

    pmoe text-segments --out runs/text-segments            # both settings, 5 sizes, 3 seeds
    pmoe text-segments --quick --out runs/text-quick       # 2 sizes, fewer steps: a smoke run

Data: `pmoe.data.text.make_text_documents`: documents of G = 4 paragraphs of S = 4 sentences
(n = 16 segments, the paper's n), one class-discriminative key sentence each.  "synthetic" is
the paper's §3 model in words; "stdlib" is real English from the standard library's
docstrings (file-system vs numeric modules' sentences as the key, every other module's as
distractors).  Train and test sentences never overlap.  Repetition r builds its data with seed
`seed*1000 + r` (its own pool split, documents and test set) and trains on the first N
documents (exactly class-balanced: labels alternate in pairs).

Models (`TextClassifier`), one front end and one head for all: hashed words -> learned
`pmoe.text.SegmentEmbedding` (dim 32) -> a segment layer with 32 ReLU neurons in all -> a linear
head on the pooled features -> one logit.
- dense: one expert that sees every segment: ReLU(W x_j), mean over the n segments.
- pmoe: `pmoe.PMoE` on the n = G*S segments, k = 4 experts of 8 neurons, each taking its
  top l = 4 segments; its pooled output (a softmax-weighted mean per expert).
- pmoe-hier: `pmoe.HierarchicalPMoE`, k1 = 2 top-level experts each taking l1 = 2 of the 4
  paragraphs, k2 = 2 sub-experts (8 neurons) each taking l2 = 2 of a paragraph's 4 sentences:
  every sub-expert sees 4 of the 16 segments, as a flat expert does.
- key-only (a reference, not a contender; `--no-oracle` drops it): the dense model trained and
  tested on the key sentence alone, i.e. told where the key is: the ceiling that routing could
  reach if it always found the key and nothing else.
Recipe (every model, the same minibatches per repetition): Adam, learning rate 0.01, batch 32,
a fixed number of steps (so every size gets the same training compute), logistic loss; test
accuracy every eval_every steps.  Learning speed: the first evaluated step whose test accuracy
reaches the setting's target.  FLOPs: `pmoe.experiments.flops.model_flops` (FlopCounterMode on
the real forward, and forward + backward) on one batch, per document; the front end (a lookup
and a mean) has no multiply-adds and is counted by none, see FRONT_END below.

Output: DIR/results.json
    settings: {setting: {"samples": [N...], "target": acc, "steps": [evaluated steps],
        "models": {model (MODELS and ORACLE): {"acc": [[per repetition] per N], "acc_mean", "acc_std": [per N],
            "curves": [[[test acc per evaluated step] per repetition] per N],
            "steps_to_target": [[step or None] per N], "infer_flops", "train_flops" (per document),
            "train_seconds": [[...]], "routing": [[key-routing metrics] per N] (routed models),
            "key_routed_mean": [per N], "chance": chance-level metrics}},
        "pools": sentence-pool sizes, "front_end_adds_per_doc": words per test document * dim}}
    config: everything needed to rerun, the machine and the wall time
and DIR/text_segments.png: per setting, accuracy vs N, accuracy vs cumulative training FLOPs
(largest N) and the fraction of test documents whose key sentence some expert took.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .common import (environment, int_list, mean_std, new_figure, positive_float, positive_int, prepare_out_dir,
                     progress_bar, save_figure, set_threads, write_json)
from .flops import model_flops

MODELS = ("dense", "pmoe", "pmoe-hier")
ORACLE = "key-only"  # reference: the dense model told where the key is, trained on the key sentence alone
SETTINGS = ("synthetic", "stdlib")
COLORS = {"dense": "tab:blue", "pmoe": "tab:orange", "pmoe-hier": "tab:green", ORACLE: "tab:gray"}
# the architecture: the data layout, the front end, and each model's routing
ARCH = {"groups": 4, "segments": 4, "max_words": 24, "buckets": 8192, "dim": 32, "neurons": 32,
        "pmoe": {"num_experts": 4, "top_l": 4},
        "pmoe-hier": {"num_group_experts": 2, "top_groups": 2, "num_experts": 2, "top_l": 2}}
SAMPLES = {"synthetic": [50, 100, 200, 400, 800], "stdlib": [200, 400, 800, 1600, 3200]}
TARGETS = {"synthetic": 0.9, "stdlib": 0.7}
QUICK = {"samples": {"synthetic": [50, 400], "stdlib": [400, 1600]}, "steps": 200, "n_test": 500,
         "eval_every": 50}
FRONT_END = ("not counted: the word lookup and the mean over a segment's words, words*dim additions per document "
             "(front_end_adds_per_doc), alike for every model; nor the optimizer's update")


# ----------------------------------------------------------------------------- models

class TextClassifier(nn.Module):
    """ids (B, G, S, T) -> logit (B,): SegmentEmbedding, the model's segment layer pooled over the
    segments ((B, neurons)), a linear head.  forward(ids, return_routing=True) also returns the
    layer's routing (None for the dense model).

    kind "dense": mean_j ReLU(W x_j) over all G*S segments (one expert sees every segment);
    "pmoe": pmoe.PMoE on the G*S segments, pooled (per expert a softmax-weighted mean of its l
    segments); "pmoe-hier": pmoe.HierarchicalPMoE on the (G, S) segments, pooled.
    """

    def __init__(self, kind: str, arch: dict = ARCH):
        super().__init__()
        from ..hierarchical import HierarchicalPMoE
        from ..layers import PMoE
        from ..text import SegmentEmbedding

        if kind not in MODELS:
            raise ValueError(f"unknown model {kind!r}; expected one of {MODELS}")
        self.kind = kind
        dim, neurons = arch["dim"], arch["neurons"]
        self.embed = SegmentEmbedding(arch["buckets"], dim)
        if kind == "dense":
            self.layer = nn.Linear(dim, neurons, bias=False)
        elif kind == "pmoe":
            self.layer = PMoE(dim, neurons, **arch["pmoe"])
        else:
            self.layer = HierarchicalPMoE(dim, neurons, **arch["pmoe-hier"])
        self.head = nn.Linear(neurons, 1)

    def features(self, x: torch.Tensor):
        """(B, G, S, dim) segment vectors -> ((B, neurons), routing or None)."""
        if self.kind == "dense":
            return torch.relu(self.layer(x)).mean((1, 2)), None
        if self.kind == "pmoe":
            return self.layer.forward_pooled(x.flatten(1, 2), return_routing=True)
        return self.layer.forward_pooled(x, return_routing=True)

    def forward(self, ids: torch.Tensor, return_routing: bool = False):
        feats, routing = self.features(self.embed(ids))
        logit = self.head(feats).squeeze(-1)
        return (logit, routing) if return_routing else logit


# ----------------------------------------------------------------------------- training and metrics

def _accuracy(net: nn.Module, test) -> float:
    """Test accuracy (pmoe.train.evaluate expects image datasets and a flat Routing)."""
    from ..train import predictions

    net.eval()
    with torch.no_grad():
        acc = (predictions(net(test.ids)) == test.y).double().mean().item()
    net.train()
    return acc


def train_text_model(net: nn.Module, train, test, steps: int, lr: float, batch_size: int, eval_every: int,
                     seed: int) -> dict:
    """The recipe of the module docstring.  Returns {"curve": [test acc every eval_every steps,
    and after the last], "steps": [those steps], "acc": the last, "train_seconds"}."""
    from ..train import classification_loss

    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)  # the same minibatches for every model
    order, seconds, curve, at = torch.empty(0, dtype=torch.int64), 0.0, [], []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(train), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        t0 = time.perf_counter()
        loss = classification_loss(net(train.ids[idx]), train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            curve.append(_accuracy(net, test))
            at.append(step)
    return {"curve": curve, "steps": at, "acc": curve[-1], "train_seconds": seconds}


def steps_to_target(curve: Sequence[float], steps: Sequence[int], target: float) -> Optional[int]:
    """The first evaluated step whose accuracy reaches target (None if none does)."""
    return next((s for s, a in zip(steps, curve) if a >= target), None)


@torch.no_grad()
def key_routing(net: nn.Module, test) -> dict:
    """Where the routed model sends the key sentence of each test document.

    capture_any: fraction of documents whose key sentence some (sub-)expert took; capture: per
    (sub-)expert; for pmoe-hier also group_capture (per top-level expert: took the key's
    paragraph) and group_capture_any."""
    if net.kind == "dense":
        raise ValueError("the dense model routes nothing: key_routing needs pmoe or pmoe-hier")
    net.eval()
    _, routing = net(test.ids, return_routing=True)
    net.train()
    if net.kind == "pmoe":
        hits = (routing.indices == test.key_index.view(-1, 1, 1)).any(-1)  # (N, k)
        return {"capture": hits.double().mean(0).tolist(), "capture_any": hits.any(1).double().mean().item()}
    groups = routing.group_hits(test.key_group)  # (N, k1)
    hits = routing.segment_hits(test.key_group, test.key_segment).flatten(1)  # (N, k1*k2)
    return {"capture": hits.double().mean(0).tolist(), "capture_any": hits.any(1).double().mean().item(),
            "group_capture": groups.double().mean(0).tolist(),
            "group_capture_any": groups.any(1).double().mean().item()}


def chance_routing(key: str, arch: dict = ARCH) -> dict:
    """key_routing's numbers for routing that ignores the content (every expert's choice uniform
    and independent of the others')."""
    G, S = arch["groups"], arch["segments"]
    if key == "pmoe":
        k, l = arch["pmoe"]["num_experts"], arch["pmoe"]["top_l"]
        return {"capture": l / (G * S), "capture_any": 1 - (1 - l / (G * S)) ** k}
    if key == "pmoe-hier":
        h = arch["pmoe-hier"]
        group = h["top_groups"] / G
        inside = 1 - (1 - h["top_l"] / S) ** h["num_experts"]  # some sub-expert of a top-level expert
        return {"capture": group * h["top_l"] / S, "capture_any": 1 - (1 - group * inside) ** h["num_group_experts"],
                "group_capture": group, "group_capture_any": 1 - (1 - group) ** h["num_group_experts"]}
    raise ValueError(f"{key!r} routes nothing: chance_routing needs pmoe or pmoe-hier")


def per_document_flops(net: nn.Module, ids: torch.Tensor) -> dict:
    """Counted inference and training (forward + backward) FLOPs per document, on the batch ids."""
    from ..train import classification_loss

    y = torch.arange(len(ids)) % 2
    flops = model_flops(net, ids, lambda logit: classification_loss(logit, y))
    return {k: v / len(ids) for k, v in flops.items()}


# ----------------------------------------------------------------------------- the experiment

def run_model(key: str, train, test, run_seed: int, steps: int, lr: float, batch_size: int, eval_every: int,
              target: float) -> dict:
    """Build model `key` (one of MODELS or ORACLE) from seed run_seed, train it, and measure it
    (one repetition, one size).  The oracle is the dense model on the key sentences alone."""
    from ..train import seed_everything

    if key == ORACLE:
        train, test = train.key_only(), test.key_only()
    seed_everything(run_seed)
    net = TextClassifier("dense" if key == ORACLE else key)
    res = train_text_model(net, train, test, steps, lr, batch_size, eval_every, run_seed)
    res["steps_to_target"] = steps_to_target(res["curve"], res["steps"], target)
    if net.kind != "dense":
        res["routing"] = key_routing(net, test)
    return res


def _new_model_record(key: str, samples: Sequence[int], batch) -> dict:
    """Empty per-size lists, and the counted FLOPs per document on `batch` (a TextDataset)."""
    ids = batch.key_only().ids if key == ORACLE else batch.ids
    record = {"acc": [[] for _ in samples], "curves": [[] for _ in samples],
              "steps_to_target": [[] for _ in samples], "train_seconds": [[] for _ in samples],
              **per_document_flops(TextClassifier("dense" if key == ORACLE else key), ids)}
    if key in ("pmoe", "pmoe-hier"):
        record["routing"], record["chance"] = [[] for _ in samples], chance_routing(key)
    return record


def _summarize_model(record: dict) -> None:
    record["acc_mean"] = [mean_std(a)[0] for a in record["acc"]]
    record["acc_std"] = [mean_std(a)[1] for a in record["acc"]]
    if "routing" in record:
        record["key_routed_mean"] = [mean_std([r["capture_any"] for r in rs])[0] for rs in record["routing"]]


def run_setting(setting: str, samples: Sequence[int], seeds: int, seed: int, steps: int, lr: float,
                batch_size: int, n_test: int, eval_every: int, target: float, models: Sequence[str], bar) -> dict:
    """Every model, size and repetition of one data setting; returns its results entry."""
    from ..data.text import make_text_documents

    layout = {k: ARCH[k] for k in ("groups", "segments", "max_words", "buckets")}
    out = {"samples": list(samples), "target": target, "models": {}}
    for r in range(seeds):
        run_seed = seed * 1000 + r
        pool, test = make_text_documents(setting, samples[-1], n_test, run_seed, **layout)
        if r == 0:
            out["models"] = {key: _new_model_record(key, samples, pool.subset(slice(0, batch_size))) for key in models}
            out["front_end_adds_per_doc"] = test.words_per_document() * ARCH["dim"]
        for i, n in enumerate(samples):
            for key in models:
                bar.set_postfix_str(f"{setting} N={n} rep={r} {key}")
                res = run_model(key, pool.subset(slice(0, n)), test, run_seed, steps, lr, batch_size, eval_every,
                                target)
                _record(out["models"][key], i, res)
                tqdm.write(_line(setting, n, r, key, res))
                bar.update()
            out["steps"] = res["steps"]
    for record in out["models"].values():
        _summarize_model(record)
    return out


def _record(record: dict, i: int, res: dict) -> None:
    for name in ("acc", "steps_to_target", "train_seconds"):
        record[name][i].append(res[name])
    record["curves"][i].append(res["curve"])
    if "routing" in res:
        record["routing"][i].append(res["routing"])


def _line(setting: str, n: int, r: int, key: str, res: dict) -> str:
    line = f"{setting:<9} N={n:<5} rep {r} {key:<9} test {100 * res['acc']:5.1f}%  to target {res['steps_to_target']}"
    if "routing" in res:
        line += f"  key routed {res['routing']['capture_any']:.2f}"
        if "group_capture_any" in res["routing"]:
            line += f" (paragraph {res['routing']['group_capture_any']:.2f})"
    return line


def text_segments(settings: Sequence[str] = SETTINGS, samples: Optional[dict] = None, seeds: int = 3, seed: int = 0,
                  steps: int = 800, lr: float = 0.01, batch_size: int = 32, n_test: int = 1000,
                  eval_every: int = 25, targets: Optional[dict] = None, models: Sequence[str] = (*MODELS, ORACLE),
                  progress: bool = True) -> dict:
    """Run the experiment; returns the results dict of the module docstring (writes nothing).
    samples / targets: {setting: ...}, default SAMPLES / TARGETS; models: from MODELS and ORACLE."""
    bad = [m for m in models if m not in (*MODELS, ORACLE)]
    if bad or not models:
        raise ValueError(f"unknown models {bad}; expected names from {(*MODELS, ORACLE)}")
    if not lr > 0:
        raise ValueError(f"--lr must be positive, got {lr}")
    for name, v in (("--seeds", seeds), ("--steps", steps), ("--batch-size", batch_size), ("--n-test", n_test),
                    ("--eval-every", eval_every)):
        positive_int(name, v)
    samples = {s: sorted(positive_int("each sample size", n) for n in (samples or SAMPLES)[s]) for s in settings}
    targets = {s: (targets or TARGETS)[s] for s in settings}
    start = time.perf_counter()
    bar = progress_bar(sum(len(v) for v in samples.values()) * seeds * len(models), "text-segments", progress)
    results = {"settings": {s: run_setting(s, samples[s], seeds, seed, steps, lr, batch_size, n_test, eval_every,
                                           targets[s], models, bar) for s in settings}}
    bar.close()
    for s in settings:
        results["settings"][s]["pools"] = _pool_sizes(s, seed)
    results["config"] = {"settings": list(settings), "seeds": seeds, "seed": seed, "steps": steps, "lr": lr,
                         "batch_size": batch_size, "n_test": n_test, "eval_every": eval_every, "models": list(models),
                         "arch": ARCH, "front_end_flops": FRONT_END,
                         "recipe": "Adam, constant learning rate, logistic loss, same minibatches for every model",
                         "wall_seconds": round(time.perf_counter() - start, 1), **environment()}
    return results


def _pool_sizes(setting: str, seed: int) -> dict:
    from ..data.text import stdlib_pools, synthetic_pools

    pools = stdlib_pools() if setting == "stdlib" else synthetic_pools(seed * 1000)
    return dict(zip(("key_class0", "key_class1", "distractors"), (len(p) for p in pools)))


# ----------------------------------------------------------------------------- output

def _steps_cell(values: Sequence[Optional[int]]) -> str:
    """"mean" over repetitions when all reached the target, else how many did."""
    reached = [v for v in values if v is not None]
    if len(reached) == len(values):
        return f"{sum(reached) / len(reached):.0f}"
    return f"not reached ({len(reached)}/{len(values)})"


def summary_table(results: dict) -> str:
    """Markdown, per setting: accuracy (%) mean ± std per N, steps to the target per N, counted
    FLOPs per document, and the fraction of test documents whose key sentence was routed."""
    lines = []
    for setting, res in results["settings"].items():
        samples, models = res["samples"], res["models"]
        dense = models.get("dense")
        head = " | ".join(f"N={n}" for n in samples)
        lines += [f"**{setting}** (target {100 * res['target']:.0f}%)", "",
                  f"| model | {head} | inference FLOPs/doc | training FLOPs/doc |", "|---|" + "---|" * (len(samples) + 2)]
        for key, m in models.items():
            cells = [f"{100 * a:.1f} ± {100 * s:.1f}" for a, s in zip(m["acc_mean"], m["acc_std"])]
            ratio = f" ({m['infer_flops'] / dense['infer_flops']:.2f}x)" if dense and key != "dense" else ""
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {m['infer_flops']:.0f}{ratio} | {m['train_flops']:.0f} |")
        lines += _front_end_lines(res)
        lines += ["", f"| steps to {100 * res['target']:.0f}% | {head} |", "|---|" + "---|" * len(samples)]
        for key, m in models.items():
            lines.append(f"| {key} | " + " | ".join(_steps_cell(v) for v in m["steps_to_target"]) + " |")
        lines += ["", f"| key sentence routed (any expert) | {head} | chance |", "|---|" + "---|" * (len(samples) + 1)]
        for key, m in models.items():
            if "routing" in m:
                lines.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in m["key_routed_mean"]) +
                             f" | {m['chance']['capture_any']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _front_end_lines(res: dict) -> list:
    """The inference ratios to dense again, with the front end's additions counted as FLOPs."""
    models, fe = res["models"], res["front_end_adds_per_doc"]
    if "dense" not in models:
        return []
    dense = models["dense"]["infer_flops"] + fe
    ratios = ", ".join(f"{key} {(m['infer_flops'] + fe) / dense:.2f}x" for key, m in models.items()
                       if key in ("pmoe", "pmoe-hier"))
    return [f"Front end: {fe:.0f} additions per document (not counted above); counting them, inference "
            f"FLOPs relative to dense: {ratios}."]


def _plot_accuracy(ax, res: dict) -> None:
    samples = res["samples"]
    for key, m in res["models"].items():
        ax.errorbar(samples, [100 * a for a in m["acc_mean"]], [100 * s for s in m["acc_std"]], marker="o",
                    capsize=3, label=key, color=COLORS.get(key), ls="--" if key == ORACLE else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(samples, [str(n) for n in samples])
    ax.minorticks_off()
    ax.set_xlabel("training documents N")
    ax.set_ylabel("test accuracy (%)")


def _plot_flops(ax, res: dict, batch_size: int) -> None:
    """Mean learning curve at the largest N against cumulative counted training FLOPs."""
    for key, m in res["models"].items():
        if key == ORACLE:  # it reads one sentence, not the document
            continue
        curves = m["curves"][-1]
        x = [s * batch_size * m["train_flops"] / 1e9 for s in res["steps"]]
        y = [100 * sum(c[e] for c in curves) / len(curves) for e in range(len(res["steps"]))]
        ax.plot(x, y, marker="o", ms=2, color=COLORS.get(key),
                label=f"{key}: {m['train_flops'] / 1e3:.0f} kFLOP/doc")
    ax.axhline(100 * res["target"], color="k", ls=":", lw=1)
    ax.set_xlabel(f"cumulative training GFLOPs (counted), N={res['samples'][-1]}")
    ax.set_ylabel("test accuracy (%)")


def _plot_routing(ax, res: dict) -> None:
    for key, m in res["models"].items():
        if "routing" not in m:
            continue
        ax.plot(res["samples"], m["key_routed_mean"], marker="o", color=COLORS.get(key), label=key)
        ax.axhline(m["chance"]["capture_any"], color=COLORS.get(key), ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(res["samples"], [str(n) for n in res["samples"]])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training documents N")
    ax.set_ylabel("key sentence routed (dashed: chance)")


def plot(results: dict, path: str) -> None:
    """One row per setting: accuracy vs N, accuracy vs training FLOPs, key sentence routed vs N."""
    settings = results["settings"]
    fig = new_figure(15, 4.2 * len(settings))
    axes = fig.subplots(len(settings), 3, squeeze=False)
    cfg = results["config"]
    for row, (setting, res) in zip(axes, settings.items()):
        _plot_accuracy(row[0], res)
        _plot_flops(row[1], res, cfg["batch_size"])
        _plot_routing(row[2], res)
        row[0].set_title(f"{setting}: {cfg['seeds']} seeds, {cfg['steps']} steps, {cfg['n_test']} test documents",
                         fontsize=10)
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- command line

def _settings(text: str) -> list:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in SETTINGS for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct names from {SETTINGS}, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: sizes {QUICK['samples']}, {QUICK['steps']} steps, {QUICK['n_test']} test documents")
    p.add_argument("--data", type=_settings, default=list(SETTINGS), help="comma-separated subset of synthetic,stdlib")
    p.add_argument("--samples", type=int_list, default=None,
                   help=f"training sizes for every setting (default {SAMPLES})")
    p.add_argument("--seeds", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--seed", type=int, default=0, help="base seed: data and every run derive from it")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 800; --quick 200)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--batch-size", type=int, default=32, help="documents per training step (default 32)")
    p.add_argument("--n-test", type=int, default=None, help="test documents (default 1000; --quick 500)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every this many steps (default 25; --quick 50)")
    p.add_argument("--no-oracle", action="store_true",
                   help=f"skip the {ORACLE} reference (the dense model trained and tested on the key sentence alone)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _pick(value, quick: bool, quick_value, default):
    return value if value is not None else (quick_value if quick else default)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    prepare_out_dir(args.out)
    samples = {s: args.samples for s in args.data} if args.samples else (QUICK["samples"] if args.quick else SAMPLES)
    results = text_segments(args.data, samples, args.seeds, args.seed, _pick(args.steps, args.quick, QUICK["steps"], 800),
                            args.lr, args.batch_size, _pick(args.n_test, args.quick, QUICK["n_test"], 1000),
                            _pick(args.eval_every, args.quick, QUICK["eval_every"], 25),
                            models=MODELS if args.no_oracle else (*MODELS, ORACLE), progress=not args.no_progress)
    results["config"]["quick"] = args.quick
    write_json(os.path.join(args.out, "results.json"), results)
    plot(results, os.path.join(args.out, "text_segments.png"))
    print(summary_table(results))
    print(f"wrote {os.path.join(args.out, 'results.json')} and text_segments.png "
          f"({results['config']['wall_seconds']:.0f} s)")
    return 0
