"""Which patches each expert picks: a picture from a `pmoe train` checkpoint.

    pmoe train --data digits-patch --model pmoe --out runs/joint
    pmoe show-routing --checkpoint runs/joint/checkpoint.pt --out routing.png

One row per test image: the image with its class-discriminative patch outlined (white, dashed),
the label and the prediction; then one panel per expert with the l patches it chose outlined in
the expert's colour and the gate value written on each.

The model and the test set are rebuilt from what `pmoe train` stores in the checkpoint
(config.meta: data, n_train, n_test, data_args, model, model_args, training; config.seed).
"""
from __future__ import annotations

import argparse
import ast
import math

import torch
from torch import nn

from .common import check_out_file, new_figure, save_figure


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint.pt written by `pmoe train`")
    p.add_argument("--out", default="routing.png", help="output PNG (default routing.png)")
    p.add_argument("--images", type=int, default=4, help="how many test images, one row each (default 4)")
    p.add_argument("--start", type=int, default=0,
                   help="test images --start .. --start + --images - 1 are shown (default 0)")
    p.add_argument("--balanced", action="store_true",
                   help="instead, from --start on, take the first image of each class in turn, so every "
                        "class shows")
    p.add_argument("--data-dir", default=None, help="for mnist-patch / cifar10 checkpoints: the data directory")


def load_trained(checkpoint: str, data_dir=None) -> tuple[nn.Module, object, dict]:
    """(model with the checkpoint's weights in eval mode, its test PatchDataset, config.meta)."""
    from ..cli import FILE_DATA
    from ..data import make_dataset
    from ..models import build_model
    from ..train import load_checkpoint, load_weights

    ck = load_checkpoint(checkpoint)
    meta, seed = ck["config"].get("meta") or {}, ck["config"]["seed"]
    missing = {"data", "n_train", "n_test", "data_args", "model", "model_args", "training"} - set(meta)
    if missing:
        raise ValueError(f"{checkpoint} has no {sorted(missing)} in config.meta: use a checkpoint from `pmoe train`")
    data_kw = _literals(checkpoint, meta["data_args"])
    if meta["data"] in FILE_DATA:
        data_kw["data_dir"] = data_dir
    _, test = make_dataset(meta["data"], meta["n_train"], meta["n_test"], seed, **data_kw)
    model = build_model(meta["model"], test.in_channels, test.patch_size, test.num_classes, meta["training"],
                        **_literals(checkpoint, meta["model_args"]))
    load_weights(model, ck, checkpoint)
    moe = getattr(model, "moe", None)
    if moe is None:
        raise ValueError(f"model {meta['model']!r} has no routed layer to show: train --model pmoe or wrn-pmoe")
    if meta["training"] == "separate" and ck["phase"] == "experts":
        moe.gate = "indicator"  # what train_separate left it with (not part of the state dict)
    return model.eval(), test, meta


def _literals(checkpoint: str, reprs) -> dict:
    """{key: value} from the {key: repr(value)} that `pmoe train` stored in the checkpoint."""
    from ..data.files import FileFormatError

    try:
        return {k: ast.literal_eval(v) for k, v in dict(reprs).items()}
    except (ValueError, SyntaxError, TypeError) as e:
        raise FileFormatError(f"checkpoint {checkpoint}: its stored arguments {reprs!r} cannot be read ({e})") from e


def grid_shape(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of a patch grid with the image's aspect ratio (the pMoE layer may sit on a
    feature map smaller than the image, e.g. 8x8 in the Wide-ResNet)."""
    rows = max(1, round(math.sqrt(num_patches * height / width)))
    if num_patches % rows:
        raise ValueError(f"cannot lay {num_patches} patches on a {height}x{width} image")
    return rows, num_patches // rows


def _display(img: torch.Tensor):
    """(C, H, W) -> an array imshow takes, scaled to [0, 1]."""
    img = img.detach().float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def pick_images(labels: torch.Tensor, start: int, count: int) -> list[int]:
    """`count` test indices from `start` on, alternating over the classes (the first image of
    each class in turn), so both classes of a binary task are shown."""
    by_class = [(labels[start:] == c).nonzero().flatten().add(start).tolist() for c in labels.unique().tolist()]
    picked = []
    for i in range(count):
        for idx in by_class:
            if i < len(idx) and len(picked) < count:
                picked.append(idx[i])
    return sorted(picked)


def plot_routing(model: nn.Module, test, index: list[int], path: str) -> dict:
    """Draw the figure for test images `index`; returns what was drawn (predictions, indices,
    gates) for checking."""
    from matplotlib.patches import Rectangle

    x = test.x[index]
    with torch.no_grad():
        out, routing = model(x, return_routing=True)
    pred = (out > 0).long() if out.dim() == 1 else out.argmax(1)
    B, k, l = routing.indices.shape
    H, W = x.shape[2:]
    gh, gw = grid_shape(routing.num_patches, H, W)
    ch, cw = H / gh, W / gw
    colors = [f"C{s % 10}" for s in range(k)]

    fig = new_figure(max(1.5 * (k + 1), 6.0), 1.6 * B + 0.4)
    axes = fig.subplots(B, k + 1, squeeze=False)
    for b in range(B):
        img = _display(x[b])
        sig = int(test.signal_index[index[b]])
        for col in range(k + 1):
            ax = axes[b][col]
            ax.imshow(img, cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if sig >= 0:  # the class-discriminative patch, inset and on top so an expert's box leaves it visible
                ax.add_patch(Rectangle(((sig % gw) * cw + 0.5, (sig // gw) * ch + 0.5), cw - 2, ch - 2, fill=False,
                                       ec="white", ls="--", lw=1, zorder=5))
        axes[b][0].set_title(f"#{index[b]}: y={int(test.y[index[b]])} pred={int(pred[b])}", fontsize=8)
        for s in range(k):
            ax = axes[b][s + 1]
            for j, g in zip(routing.indices[b, s].tolist(), routing.gates[b, s].tolist()):
                r, c = divmod(j, gw)
                ax.add_patch(Rectangle((c * cw - 0.5, r * ch - 0.5), cw, ch, fill=False, ec=colors[s], lw=2))
                ax.text((c + 0.5) * cw - 0.5, (r + 0.5) * ch - 0.5, f"{g:.2f}", color="white", fontsize=6,
                        ha="center", va="center", fontweight="bold",
                        bbox={"facecolor": colors[s], "alpha": 0.8, "pad": 0.8, "lw": 0})
            if b == 0:
                ax.set_title(f"expert {s}", fontsize=8, color=colors[s])
    fig.suptitle(f"patches each expert chose (l={l} of {routing.num_patches}) with their gate values\n"
                 f"white dashed: the class-discriminative patch", fontsize=9)
    save_figure(fig, path)
    return {"pred": pred.tolist(), "indices": routing.indices.tolist(), "gates": routing.gates.tolist()}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # a handful of images through a small model
    check_out_file(args.out)
    model, test, meta = load_trained(args.checkpoint, args.data_dir)
    if args.images < 1 or args.start < 0 or args.start + args.images > len(test):
        raise ValueError(f"--start {args.start} --images {args.images} must select from the {len(test)} test images")
    if args.balanced:
        index = pick_images(test.y, args.start, args.images)
    else:
        index = list(range(args.start, args.start + args.images))
    plot_routing(model, test, index, args.out)
    print(f"wrote {args.out}: test images {index} of {meta['data']}, model {meta['model']} "
          f"({meta['training']} training)")
    return 0
