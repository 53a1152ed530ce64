"""pmoe.data: shapes, determinism, the planted patch, disjoint splits, the file parsers."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from pmoe.data import (Spurious, digits_pool_split, image_to_patches, load_cifar10, load_mnist,
                       load_sklearn_digits, make_dataset, read_idx)
from pmoe.data.synthetic import orthonormal_patterns
from pmoe.torch_backend import patches_from_map


# ----------------------------------------------------------------------------- fake files

def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def fake_mnist(root, n_train=40, n_test=30, gz=False, seed=0):
    """MNIST/raw/*-ubyte files of random 28x28 'digits', every label present."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(raw, f"{stem}-images-idx3-ubyte{suffix}"), images, gz)
        write_idx(os.path.join(raw, f"{stem}-labels-idx1-ubyte{suffix}"), labels, gz)
        out[stem] = (images, labels)
    return out


def fake_cifar(root, per_batch=10, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    out = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n) % 10]
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        out[name] = (data, labels)
    return out


def tiles(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, n, C, p, p)."""
    N, C = x.shape[:2]
    return image_to_patches(x, p).reshape(N, -1, C, p, p)


# ----------------------------------------------------------------------------- digits-patch

@pytest.fixture(scope="module")
def digits():
    return make_dataset("digits-patch", 120, 80, seed=3)


def test_digits_patch_shapes_and_labels(digits):
    train, test = digits
    assert train.x.shape == (120, 1, 32, 32) and test.x.shape == (80, 1, 32, 32)
    assert train.x.dtype == torch.float32 and 0 <= train.x.min() and train.x.max() <= 1
    assert train.patch_size == 8 and train.num_patches == 16 and train.grid == (4, 4)
    assert set(train.y.tolist()) == {0, 1} and int(train.y.sum()) == 60  # balanced
    assert train.signal_index.min() >= 0 and train.signal_index.max() < 16
    assert torch.equal(train.y_pm, train.y.float() * 2 - 1)
    assert train.patches().shape == (120, 16, 64)
    assert len(train.tensor_dataset()) == 120


def _lookup():
    images, labels = load_sklearn_digits()
    table = {}
    for i, im in enumerate(images):
        table.setdefault(im.tobytes(), set()).add(i)
    return images, labels, table


def test_digits_patch_signal_tile_and_disjoint_pools(digits):
    images, labels, table = _lookup()
    tr_pool, te_pool = digits_pool_split(3)
    assert not set(tr_pool) & set(te_pool) and len(tr_pool) + len(te_pool) == len(images)
    for ds, pool in ((digits[0], set(tr_pool.tolist())), (digits[1], set(te_pool.tolist()))):
        t = tiles(ds.x, 8).numpy()
        for b in range(len(ds)):
            for j in range(16):
                src = table[t[b, j, 0].tobytes()]  # every tile is one of the digit images...
                assert src & pool, "a tile came from the other split's pool"
                digit = {int(labels[i]) for i in src}
                if j == ds.signal_index[b]:
                    assert digit == {int(ds.y[b])}  # ...the class digit (classes (0, 1)) ...
                else:
                    assert digit.isdisjoint({0, 1})  # ...or a distractor


def test_digits_patch_deterministic_and_seed_dependent():
    a_tr, a_te = make_dataset("digits-patch", 30, 20, seed=5)
    b_tr, b_te = make_dataset("digits-patch", 30, 20, seed=5)
    c_tr, _ = make_dataset("digits-patch", 30, 20, seed=6)
    _, d_te = make_dataset("digits-patch", 50, 20, seed=5)
    assert torch.equal(a_tr.x, b_tr.x) and torch.equal(a_te.signal_index, b_te.signal_index)
    assert not torch.equal(a_tr.x, c_tr.x)
    assert torch.equal(a_te.x, d_te.x)  # the test split does not depend on n_train


def test_digits_patch_other_classes_and_bad_arguments():
    train, _ = make_dataset("digits-patch", 20, 4, seed=0, classes=(3, 8), distractors=[1, 7])
    images, labels, table = _lookup()
    t = tiles(train.x, 8).numpy()
    for b in range(20):
        sig = {int(labels[i]) for i in table[t[b, train.signal_index[b], 0].tobytes()]}
        assert sig == {(3, 8)[int(train.y[b])]}
    with pytest.raises(ValueError, match="overlap"):
        make_dataset("digits-patch", 4, 4, classes=(0, 1), distractors=[1, 2])
    with pytest.raises(ValueError, match="two different digits"):
        make_dataset("digits-patch", 4, 4, classes=(2, 2))
    with pytest.raises(ValueError, match="n_train"):
        make_dataset("digits-patch", -1, 4)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("imagenet", 4, 4)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_patches_follow_the_data_model():
    n, d, M = 9, 16, 3
    train, test = make_dataset("synthetic", 200, 50, seed=1, n=n, d=d, num_distractors=M, noise=0.05,
                               signal_strength=2.0)
    assert train.x.shape == (200, 1, 12, 12) and train.patch_size == 4 and train.grid == (3, 3)
    xp = train.patches()
    assert xp.shape == (200, n, d)
    assert torch.equal(xp, patches_from_map(train.x, 4))  # what PMoEConv2d(patch_size=4) sees
    # the patterns, regenerated the way the generator draws them
    pats = torch.from_numpy(orthonormal_patterns(M + 3, d, np.random.default_rng(np.random.SeedSequence(1).spawn(3)[0])))
    rows = torch.arange(200)
    sig = xp[rows, train.signal_index]
    assert torch.allclose(sig, 2.0 * pats[train.y], atol=1e-6)  # noise-free, label c <-> pattern c
    assert not torch.allclose(sig, 2.0 * pats[1 - train.y], atol=1e-6)
    other = torch.ones(200, n, dtype=torch.bool)
    other[rows, train.signal_index] = False
    rest = xp[other]  # (200*(n-1), d): a distractor plus noise
    proj = rest @ pats.T
    assert proj[:, :2].abs().max() < 0.5  # no class pattern outside the signal patch
    nearest = proj[:, 2:2 + M].argmax(1)
    resid = rest - pats[2 + nearest]
    assert 0.03 < resid.std() < 0.07  # noise std 0.05


def test_synthetic_layout_options_and_errors():
    train, _ = make_dataset("synthetic", 10, 10, seed=0, n=6, d=48)  # 48 is no square: 48 channels, p = 1
    assert train.x.shape == (10, 48, 2, 3) and train.patches().shape == (10, 6, 48)
    train, _ = make_dataset("synthetic", 10, 10, seed=0, n=4, d=32, patch_size=2)
    assert train.x.shape == (10, 8, 4, 4)
    with pytest.raises(ValueError, match="at least num_distractors"):
        make_dataset("synthetic", 4, 4, d=5, num_distractors=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        make_dataset("synthetic", 4, 4, d=20, patch_size=4)


# ----------------------------------------------------------------------------- spurious marker and hook

@pytest.mark.parametrize("name", ["digits-patch", "synthetic"])
def test_spurious_marker_follows_the_rate(name):
    train, test = make_dataset(name, 400, 400, seed=0, spurious=Spurious(rate=1.0, position=5),
                               test_spurious=Spurious(rate=0.0, position=5))
    assert torch.equal(train.extras["spurious"], train.y == 1)
    assert torch.equal(test.extras["spurious"], test.y == 0)
    assert (train.signal_index != 5).all() and (test.signal_index != 5).all()
    t = tiles(train.x, train.patch_size)[:, 5]
    marked = t[train.extras["spurious"]]
    assert (marked == marked[0]).all() if name == "digits-patch" else marked.std(0).mean() < 0.2
    half, _ = make_dataset(name, 2000, 0, seed=0, spurious=Spurious(rate=0.5))
    assert 0.45 < half.extras["spurious"].double().mean() < 0.55
    assert "spurious" not in make_dataset(name, 4, 4)[0].extras
    with pytest.raises(ValueError, match="rate"):
        Spurious(rate=1.5)
    with pytest.raises(ValueError, match="outside"):
        make_dataset(name, 4, 4, spurious=Spurious(rate=1.0, position=16))


def test_tile_hook_edits_the_images():
    def hook(t, y, signal_index, rng):
        t[np.arange(len(t)), signal_index] = 0.25

    train, _ = make_dataset("digits-patch", 16, 4, seed=0, hook=hook)
    t = tiles(train.x, 8)
    assert (t[torch.arange(16), train.signal_index] == 0.25).all()


# ----------------------------------------------------------------------------- file parsers

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_parser_on_fake_files(tmp_path, gz):
    fake = fake_mnist(tmp_path, gz=gz)
    for train, stem in ((True, "train"), (False, "t10k")):
        images, labels = load_mnist(tmp_path, train)
        assert np.array_equal(images, fake[stem][0]) and np.array_equal(labels, fake[stem][1])
    ds_tr, ds_te = make_dataset("mnist-patch", 12, 6, seed=0, data_dir=str(tmp_path))
    assert ds_tr.x.shape == (12, 1, 112, 112) and ds_tr.patch_size == 28 and ds_tr.num_patches == 16
    # train tiles come from the train file, test tiles from the test file (disjoint); the
    # signal tile shows the class digit
    for ds, (images, labels) in ((ds_tr, fake["train"]), (ds_te, fake["t10k"])):
        label_of = {im.tobytes(): int(lab) for im, lab in zip(images, labels)}
        t = (tiles(ds.x, 28) * 255).round().to(torch.uint8).numpy()
        for b in range(len(ds)):
            assert all(t[b, j, 0].tobytes() in label_of for j in range(16))
            assert label_of[t[b, ds.signal_index[b], 0].tobytes()] == int(ds.y[b])


def test_idx_parser_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="10 bytes"):
        read_idx(short)


def test_cifar_parser_on_fake_files(tmp_path):
    fake = fake_cifar(tmp_path)
    images, labels = load_cifar10(tmp_path, train=True)
    assert images.shape == (50, 3, 32, 32) and labels.shape == (50,)
    assert np.array_equal(images[10:20].reshape(10, -1), fake["data_batch_2"][0])
    assert labels.tolist()[:10] == fake["data_batch_1"][1]
    train, test = make_dataset("cifar10", 30, None, seed=0, data_dir=str(tmp_path))
    assert train.x.shape == (30, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    assert train.num_classes == 10 and (train.signal_index == -1).all()
    assert abs(float(test.x.mean())) < 1.0  # standardised
    ptr, _ = make_dataset("cifar10-patch", 6, 4, seed=0, data_dir=str(tmp_path))
    assert ptr.x.shape == (6, 3, 128, 128) and ptr.patch_size == 32 and 0 <= ptr.x.min() and ptr.x.max() <= 1


@pytest.mark.parametrize("name", ["mnist-patch", "cifar10", "cifar10-patch"])
def test_missing_files_name_the_expected_paths(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="MNIST/raw/train-images-idx3-ubyte|cifar-10-batches-py/data_batch_1"):
        make_dataset(name, 4, 4, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        make_dataset(name, 4, 4)


@pytest.mark.parametrize("name", ["mnist-patch", "cifar10-patch"])
def test_file_tile_tasks_share_one_construction(tmp_path, name):
    """mnist-patch and cifar10-patch are one construction over two readers: both compose in
    pixel units and scale to [0, 1], so the default box marker is a full-intensity outline."""
    fake_mnist(tmp_path)
    fake_cifar(tmp_path)
    seen = []
    train, test = make_dataset(name, 8, 4, seed=0, data_dir=str(tmp_path), spurious=Spurious(1.0),
                               hook=lambda tiles, y, sig, rng: seen.append(tiles.dtype))
    assert seen == [np.uint8, np.uint8]  # the hook sees pixel units, on both splits
    p, channels = (28, 1) if name == "mnist-patch" else (32, 3)
    assert train.x.shape == (8, channels, 4 * p, 4 * p) and 0 <= train.x.min() and train.x.max() <= 1
    marker = tiles(train.x, p)[:, 0]  # (N, C, p, p): the marker's patch
    labelled = train.y == 1
    assert bool((marker[labelled][:, :, 0, :] == 1.0).all()) and bool((marker[labelled][:, :, 1:-1, 1:-1] == 0).all())
    # the same seed gives the same images
    again, _ = make_dataset(name, 8, 4, seed=0, data_dir=str(tmp_path), spurious=Spurious(1.0))
    assert torch.equal(again.x, train.x)
