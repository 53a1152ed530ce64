"""pmoe.data.files: no code runs from a data file, and damaged or foreign files are refused with
one clear error naming the file (never silently misread)."""
import gzip
import os
import pickle

import numpy as np
import pytest

from pmoe.data import FileFormatError, load_cifar10, load_mnist, make_dataset, read_cifar_batch, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08, shape=None) -> bytes:
    shape = array.shape if shape is None else shape
    dtype = {0x08: np.uint8, 0x0D: ">f4", 0x0C: ">i4"}[type_code]
    header = bytes([0, 0, type_code, len(shape)]) + b"".join(int(s).to_bytes(4, "big") for s in shape)
    return header + array.astype(dtype).tobytes()


def write_mnist(root, images: np.ndarray, labels: np.ndarray, image_type: int = 0x08) -> str:
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, "train-images-idx3-ubyte"), "wb") as f:
        f.write(idx_bytes(images, image_type))
    with open(os.path.join(raw, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(idx_bytes(labels))
    return raw


def cifar_dir(root) -> str:
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    return d


def write_batch(path, obj, protocol=pickle.DEFAULT_PROTOCOL) -> str:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def good_batch(n=4, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)], b"filenames": [b"a.png"] * n}


class RunsCode:
    """What an attacker would put in a batch: unpickling calls exec, which writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


# ----------------------------------------------------------------------------- CIFAR-10: no code runs

def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran.txt"
    d = cifar_dir(tmp_path)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_batch(os.path.join(d, name), good_batch())
    bad = write_batch(os.path.join(d, "data_batch_1"), {b"data": RunsCode(marker), b"labels": [0]})
    with pytest.raises(FileFormatError) as e:
        load_cifar10(tmp_path, train=True)
    msg = str(e.value)
    assert bad in msg and "builtins.exec" in msg and "nothing was run" in msg and "\n" not in msg
    assert not marker.exists()
    for name in ("cifar10", "cifar10-patch"):
        with pytest.raises(FileFormatError, match="builtins.exec"):
            make_dataset(name, 2, 2, data_dir=str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    np.array([1, "a"], dtype=object),  # object arrays unpickle python objects
    np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]),  # structured dtypes are not plain numbers
    np.ma.masked_array([1, 2]),  # an ndarray subclass
])
def test_only_plain_numeric_arrays_are_built(tmp_path, payload):
    path = write_batch(tmp_path / "b", {b"data": payload, b"labels": [0]})
    with pytest.raises(FileFormatError, match="not a CIFAR-10 python batch"):
        read_cifar_batch(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_still_load(tmp_path, protocol):
    batch = good_batch()
    images, labels = read_cifar_batch(write_batch(tmp_path / "b", batch, protocol))
    assert images.dtype == np.uint8 and np.array_equal(images.reshape(4, -1), batch[b"data"])
    assert labels.tolist() == batch[b"labels"]


# ----------------------------------------------------------------------------- CIFAR-10: damaged batches

def test_images_and_labels_must_pair_up(tmp_path):
    batch = good_batch(n=20)
    batch[b"labels"] = batch[b"labels"][:19]
    path = write_batch(tmp_path / "b", batch)
    with pytest.raises(FileFormatError, match="20 images but 19 labels"):
        read_cifar_batch(path)


def test_float_cifar_pixels_are_refused_not_zeroed(tmp_path):
    batch = good_batch()
    batch[b"data"] = batch[b"data"] / 255.0  # floats in [0, 1]: uint8 would make them all 0
    with pytest.raises(FileFormatError, match="pixels are float64.*0..255"):
        read_cifar_batch(write_batch(tmp_path / "b", batch))


@pytest.mark.parametrize("content, match", [
    (b"", "not a CIFAR-10 python batch"),  # empty
    (None, "not a CIFAR-10 python batch"),  # truncated (filled in below)
    (b"this is text, not a pickle\n", "not a CIFAR-10 python batch"),
])
def test_damaged_cifar_batches_name_the_file(tmp_path, content, match):
    path = tmp_path / "b"
    if content is None:
        content = pickle.dumps(good_batch())[:-100]
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=match) as e:
        read_cifar_batch(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("batch, match", [
    ([1, 2], "holds a list, not a dict"),
    ({b"labels": [0]}, "no 'data' entry"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"shape \(N, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels lie in \[0, 10\]"),
    ({b"data": np.zeros((2, 3072), np.int64) + 300, b"labels": [0, 1]}, "pixel values lie in"),
])
def test_cifar_batch_contents_are_checked(tmp_path, batch, match):
    with pytest.raises(FileFormatError, match=match):
        read_cifar_batch(write_batch(tmp_path / "b", batch))


# ----------------------------------------------------------------------------- IDX / MNIST

def test_idx_sizes_are_computed_without_overflow(tmp_path):
    # 65536**4 * 1 byte wraps to 0 in int64, which matched an empty data section
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 8, 4]) + (65536).to_bytes(4, "big") * 4)
    with pytest.raises(FileFormatError, match="18446744073709551616 bytes"):
        read_idx(path)


def test_truncated_idx_header_names_the_file(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big"))
    with pytest.raises(FileFormatError, match="truncated header") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_float_idx_images_are_refused_not_zeroed(tmp_path):
    rng = np.random.default_rng(0)
    raw = write_mnist(tmp_path, rng.random((10, 28, 28)), np.arange(10), image_type=0x0D)
    assert read_idx(os.path.join(raw, "train-images-idx3-ubyte")).dtype == np.float32  # the parser reads it as is
    with pytest.raises(FileFormatError, match="train-images-idx3-ubyte: pixels are float32"):
        load_mnist(tmp_path, train=True)


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((10, 784)), np.arange(10), r"square images \(N, H, H\)"),  # wrong ndim
    (np.zeros((10, 28, 28)), np.arange(9), "10 images but 9 labels"),
    (np.zeros((10, 28, 28)), np.arange(10) + 1, r"labels lie in \[1, 10\]"),
])
def test_mnist_file_contents_are_checked(tmp_path, images, labels, match):
    write_mnist(tmp_path, images, labels)
    with pytest.raises(FileFormatError, match=match):
        load_mnist(tmp_path, train=True)


@pytest.mark.parametrize("damage", ["not gzip", "truncated gzip"])
def test_damaged_gzip_files_name_the_file(tmp_path, damage):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    packed = gzip.compress(idx_bytes(np.zeros((4, 28, 28))))
    path.write_bytes(b"plain bytes, no gzip header" if damage == "not gzip" else packed[:len(packed) // 2])
    with pytest.raises(FileFormatError, match="not a readable gzip file") as e:
        read_idx(path)
    assert str(path) in str(e.value)
