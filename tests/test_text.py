"""The segment front end (pmoe.text) and the offline text documents (pmoe.data.text)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from pmoe.data.text import (KEY_MODULES, balanced_labels, docstring_sentences, make_text_documents, sentence_ok,
                            stdlib_pools, synthetic_pools)
from pmoe.text import SegmentEmbedding, encode_segments, hash_word, split_sentences, word_windows, words


# ----------------------------------------------------------------------------- front end

def test_words_sentences_and_windows():
    assert words("Return the os.path of 2 Files!") == ["return", "the", "os", "path", "of", "2", "files"]
    assert split_sentences("One two.  Three?\nno split here. Four! five") == ["One two.", "Three? no split here.",
                                                                           "Four! five"]
    assert split_sentences("First one. Second one.\n\nThird.") == ["First one.", "Second one.", "Third."]
    assert word_windows(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert word_windows([], 2) == []
    with pytest.raises(ValueError, match="width must be a positive int"):
        word_windows(["a"], 0)
    with pytest.raises(TypeError, match="text must be a str"):
        words(b"bytes")


def test_hash_is_stable_across_processes_and_in_range():
    """Python's hash() is salted per process; the bucket must not be."""
    code = "from pmoe.text import hash_word; print(hash_word('directory', 8192), hash_word('mean', 8192))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.split()
    assert [int(v) for v in other] == [hash_word("directory", 8192), hash_word("mean", 8192)]
    buckets = [hash_word(f"w{i}", 16) for i in range(500)]
    assert min(buckets) == 1 and max(buckets) == 15  # 0 is padding, never a word
    with pytest.raises(ValueError, match="buckets must be an int >= 2"):
        hash_word("a", 1)


def test_encode_segments_pads_and_truncates():
    ids = encode_segments(["Copy a file.", ["mean", "of", "data", "points"], ""], max_words=3, buckets=64)
    assert ids.shape == (3, 3) and ids.dtype == torch.int64
    assert ids[0].tolist() == [hash_word(w, 64) for w in ("copy", "a", "file")]
    assert ids[1].tolist() == [hash_word(w, 64) for w in ("mean", "of", "data")]  # truncated
    assert ids[2].tolist() == [0, 0, 0]


def test_segment_embedding_is_the_mean_of_word_vectors():
    emb = SegmentEmbedding(buckets=10, dim=4)
    ids = torch.tensor([[[3, 5, 0, 0], [0, 0, 0, 0]]])  # (1, 2, 4): a two-word segment and an empty one
    out = emb(ids)
    w = emb.embedding.weight
    assert out.shape == (1, 2, 4)
    assert torch.allclose(out[0, 0], (w[3] + w[5]) / 2)
    assert torch.equal(out[0, 1], torch.zeros(4))
    out[0, 0].sum().backward()
    assert emb.embedding.weight.grad[[3, 5]].abs().sum() > 0 and emb.embedding.weight.grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        emb(torch.tensor([[10]]))
    with pytest.raises(TypeError, match="int64"):
        emb(torch.zeros(1, 2))


# ----------------------------------------------------------------------------- sentence pools

def test_docstring_sentences_keep_prose_only():
    doc = ("Return the arithmetic mean of the data points.\n\n"
           ">>> mean([1, 2, 3])\n2\n\n"
           "Usage:\n    mean(data)  # an indented code line\n\n"
           "Short one. If the data is empty, StatisticsError is raised by this function.")
    assert docstring_sentences(doc) == ["Return the arithmetic mean of the data points.",
                                        "If the data is empty, StatisticsError is raised by this function."]
    assert not sentence_ok("x = f(a, b) + g[c] * 2 ** 3 {} ().")
    assert not sentence_ok("lowercase start of a sentence is rejected here.")


def test_stdlib_pools_are_real_disjoint_and_sizeable():
    """Counts differ between Python versions: only lower bounds and disjointness are asserted."""
    fs, num, distractors = stdlib_pools()
    assert len(fs) >= 100 and len(num) >= 100 and len(distractors) >= 1000
    norm = [{" ".join(words(s)) for s in pool} for pool in (fs, num, distractors)]
    assert not (norm[0] & norm[1]) and not (norm[2] & (norm[0] | norm[1]))
    assert all(sentence_ok(s) for pool in (fs, num, distractors) for s in pool)
    assert any("director" in s or "file" in s for s in fs) and any("decimal" in s.lower() or "mean" in s for s in num)
    assert "os" in KEY_MODULES[0] and "statistics" in KEY_MODULES[1]


def test_synthetic_pools_follow_the_topic_model():
    c0, c1, distractors = synthetic_pools(0, num_topics=3, topic_words=10, noise_words=20, noise=0.5, pool_size=50)
    assert len(c0) == len(c1) == 50 and len(distractors) == 150
    assert len(set(c0)) == 50  # distinct
    for pool, topic in ((c0, "t0w"), (c1, "t1w")):
        ws = [w for s in pool for w in words(s)]
        assert all(w.startswith((topic, "nw")) for w in ws)
        assert 0.35 < np.mean([w.startswith("nw") for w in ws]) < 0.65  # noise = 0.5
    assert not any(w.startswith(("t0w", "t1w")) for s in distractors for w in words(s))
    with pytest.raises(ValueError, match="noise must lie in"):
        synthetic_pools(0, noise=1.0)


# ----------------------------------------------------------------------------- documents

@pytest.mark.parametrize("setting", ["synthetic", "stdlib"])
def test_documents_are_deterministic_disjoint_and_keyed(setting):
    kw = dict(groups=3, segments=4, max_words=12, buckets=1024)
    train, test = make_text_documents(setting, 40, 30, seed=7, **kw)
    again, _ = make_text_documents(setting, 40, 30, seed=7, **kw)
    other, _ = make_text_documents(setting, 40, 30, seed=8, **kw)
    assert torch.equal(train.ids, again.ids) and torch.equal(train.y, again.y)
    assert not torch.equal(train.ids, other.ids)
    assert train.ids.shape == (40, 3, 4, 12) and test.ids.shape == (30, 3, 4, 12)
    assert not set(train.sentences) & set(test.sentences)  # no sentence in both splits
    assert int(train.y[:20].sum()) == 10  # even prefixes are balanced
    fs, num, _ = stdlib_pools() if setting == "stdlib" else synthetic_pools(7)
    for ds in (train, test):
        for i in range(len(ds)):
            doc = ds.document(i)
            key = doc[ds.key_group[i]][ds.key_segment[i]]
            assert key in (fs, num)[int(ds.y[i])]
            others = [s for g, para in enumerate(doc) for j, s in enumerate(para)
                      if (g, j) != (ds.key_group[i], ds.key_segment[i])]
            assert not set(others) & (set(fs) | set(num))  # one key sentence per document
    assert torch.equal(train.key_index, train.key_group * 4 + train.key_segment)
    row = train.sentence_index[0, 0, 0]
    assert torch.equal(train.ids[0, 0, 0], encode_segments([train.sentences[row]], 12, 1024)[0])


def test_balanced_labels_and_bad_arguments():
    rng = np.random.default_rng(0)
    y = balanced_labels(9, rng)
    assert len(y) == 9 and all(y[2 * i] != y[2 * i + 1] for i in range(4))
    with pytest.raises(ValueError, match="unknown text setting"):
        make_text_documents("wikipedia", 2, 2)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        make_text_documents("synthetic", 2, 2, groups=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        make_text_documents("synthetic", 2, 2, seed="0")
    subset = make_text_documents("synthetic", 6, 2)[0].subset(slice(0, 4))
    assert len(subset) == 4 and subset.num_segments == 24
