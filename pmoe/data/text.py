"""Offline text documents with one class-discriminative sentence each: the paper's data model
(§3) and `digits-patch` (real content in a controlled layout), for text.

    train, test = make_text_documents("stdlib", n_train=400, n_test=500, seed=0)
    train.ids          (N, G, S, T) int64 hashed word ids (pmoe.text), G paragraphs of S sentences
    train.y            (N,) int64 class 0 or 1
    train.key_group    (N,) the paragraph holding the key sentence; train.key_segment (N,) its place in it
    train.key_index    (N,) key_group * S + key_segment: its number among the G*S sentences
    train.document(i)  the text, as G lists of S sentences

A document is G paragraphs of S sentences.  Exactly one sentence, the key, comes from the pool
of its class; it sits at a uniformly random (paragraph, place).  Every other sentence is a
distractor drawn uniformly, with replacement, from a pool shared by both classes.  Labels are
balanced in pairs (documents 2i and 2i+1 have different labels), so every even-sized prefix is
exactly balanced.  Train and test documents draw from disjoint halves of every pool: no
sentence of a test document occurs in any training document.  Everything follows from `seed`.

Settings:
- "stdlib": real English that ships with Python.  Sentences are cut from the docstrings of the
  standard library's .py files (read with `ast`, nothing is imported).  Class 0's key sentences
  come from file-system modules (KEY_MODULES[0]: os, shutil, pathlib, tempfile, zipfile, ...),
  class 1's from numeric modules (KEY_MODULES[1]: statistics, fractions, the pure-Python
  decimal, random, numbers, ...); the distractors from every other module (tests, IDLE, tkinter,
  lib2to3 left out).  Kept: paragraphs without doctest or indented (code) lines, then sentences
  of 6 to 30 words that start upper-case, end with '.', and are at least 85% letters and
  spaces.  Deduplicated by their lowercase word sequence; a sentence found in both key pools is
  dropped, and one in a key pool is removed from the distractors.  Docstrings differ between
  Python versions, so the pool sizes do too (3.11: about 550 / 480 key sentences and 8000
  distractors); too small a pool raises an error.  Distractor modules may still mention files
  or numbers (io, fileinput-like text elsewhere): they are class-irrelevant because they are
  drawn alike for both classes, but a router that keys on such words will take some of them.
- "synthetic": the paper's §3 model in words.  There are 2 class topics and num_topics
  distractor topics, each with its own topic_words pseudo-words ("t3w7"), plus a shared noise
  vocabulary of noise_words words ("nw12").  A sentence of topic t has a length uniform in
  [6, 14]; each word is one of t's words with probability 1 - noise, else a noise word.  Key
  sentences have the class topic; distractors a uniformly random distractor topic.  Each topic's
  pool holds pool_size distinct sentences, split in halves for train and test.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..text import encode_segments, words
from .base import check_count

SETTINGS = ("stdlib", "synthetic")
KEY_MODULES = (
    ("os", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "posixpath", "ntpath", "genericpath",
     "stat", "zipfile", "tarfile", "fileinput"),
    ("statistics", "fractions", "_pydecimal", "decimal", "random", "numbers", "colorsys"),
)
CLASS_NAMES = ("file system", "numeric")
EXCLUDED_MODULES = frozenset({"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "turtle", "ensurepip",
                              "site-packages", "dist-packages", "pydoc_data", "this", "antigravity"})
MIN_KEY_POOL, MIN_DISTRACTORS = 40, 200  # per class; a smaller pool cannot make disjoint halves worth testing


@dataclass
class TextDataset:
    """One split.  ids (N, G, S, T) int64 (0 = padding); y, key_group, key_segment (N,) int64;
    sentence_index (N, G, S) int64 rows of `sentences`, the table of distinct sentences used;
    buckets: the hashed vocabulary size the ids were made with."""

    ids: torch.Tensor
    y: torch.Tensor
    key_group: torch.Tensor
    key_segment: torch.Tensor
    sentence_index: torch.Tensor
    sentences: tuple
    buckets: int
    num_classes: int = 2

    def __post_init__(self) -> None:
        N = self.ids.shape[0]
        if self.ids.dim() != 4 or self.sentence_index.shape != self.ids.shape[:3]:
            raise ValueError(f"ids must be (N, G, S, T) and sentence_index (N, G, S), got "
                             f"{tuple(self.ids.shape)} and {tuple(self.sentence_index.shape)}")
        for name in ("y", "key_group", "key_segment"):
            if getattr(self, name).shape != (N,):
                raise ValueError(f"{name} must have shape ({N},), got {tuple(getattr(self, name).shape)}")

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def groups(self) -> int:
        return self.ids.shape[1]

    @property
    def segments_per_group(self) -> int:
        return self.ids.shape[2]

    @property
    def num_segments(self) -> int:
        return self.groups * self.segments_per_group

    @property
    def key_index(self) -> torch.Tensor:
        """(N,) the key sentence's number among the G*S sentences (paragraph-major)."""
        return self.key_group * self.segments_per_group + self.key_segment

    def subset(self, index) -> "TextDataset":
        return TextDataset(self.ids[index], self.y[index], self.key_group[index], self.key_segment[index],
                           self.sentence_index[index], self.sentences, self.buckets, self.num_classes)

    def key_only(self) -> "TextDataset":
        """The same documents cut down to their key sentence: ids (N, 1, 1, T), key at (0, 0).
        The input of an oracle that is told where the key is."""
        rows = torch.arange(len(self))
        pick = (rows, self.key_group, self.key_segment)
        zero = torch.zeros_like(self.key_group)
        return TextDataset(self.ids[pick][:, None, None], self.y, zero, zero, self.sentence_index[pick][:, None, None],
                           self.sentences, self.buckets, self.num_classes)

    def words_per_document(self) -> float:
        """Mean number of (non-padding) word ids per document."""
        return (self.ids != 0).sum().item() / max(len(self), 1)

    def document(self, i: int) -> list:
        """Document i as G lists of S sentence strings."""
        return [[self.sentences[j] for j in row.tolist()] for row in self.sentence_index[i]]


# ----------------------------------------------------------------------------- standard-library sentences

def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def module_files(name: str, lib: str) -> list:
    """The .py files of top-level module `name` in `lib`: name.py, or every .py file of the
    package `name/` (sorted, test directories left out); [] if neither exists."""
    path = os.path.join(lib, name)
    if os.path.isfile(path + ".py"):
        return [path + ".py"]
    if not os.path.isfile(os.path.join(path, "__init__.py")):
        return []
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "__pycache__"))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return out


def stdlib_modules(lib: str) -> list:
    """Sorted names of the top-level modules and packages in `lib`."""
    names = []
    for entry in sorted(os.listdir(lib)):
        if entry.endswith(".py"):
            names.append(entry[:-3])
        elif os.path.isfile(os.path.join(lib, entry, "__init__.py")):
            names.append(entry)
    return names


def file_docstrings(path: str) -> list:
    """Docstrings of the module, its classes and functions (ast; [] for an unreadable file)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) for d in [ast.get_docstring(node)] if d]


def sentence_ok(s: str) -> bool:
    """6 to 30 words, an upper-case start, a final '.', at least 85% letters and spaces."""
    n = len(s.split())
    return (6 <= n <= 30 and s[0].isupper() and s.endswith(".")
            and sum(c.isalpha() or c.isspace() for c in s) >= 0.85 * len(s))


def docstring_sentences(doc: str) -> list:
    """The prose sentences of a docstring (see the module docstring for what is kept)."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(ln.startswith((" ", "\t")) or ln.lstrip().startswith((">>>", "...")) for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if s and sentence_ok(s)]
    return out


def module_sentences(names: Sequence[str], lib: str) -> dict:
    """{lowercase word sequence: first sentence seen with it} over the docstrings of `names`."""
    found = {}
    for name in names:
        for path in module_files(name, lib):
            for doc in file_docstrings(path):
                for s in docstring_sentences(doc):
                    found.setdefault(" ".join(words(s)), s)
    return found


@functools.lru_cache(maxsize=4)
def stdlib_pools(lib: Optional[str] = None) -> tuple:
    """(class-0 key sentences, class-1 key sentences, distractors): sorted tuples of distinct
    sentences from the standard library at `lib` (default: this Python's).  Raises ValueError
    when a pool is too small to split."""
    lib = lib or stdlib_dir()
    keys = [module_sentences(mods, lib) for mods in KEY_MODULES]
    key_modules = set(KEY_MODULES[0]) | set(KEY_MODULES[1])
    others = [m for m in stdlib_modules(lib) if m not in key_modules and m not in EXCLUDED_MODULES]
    distractors = module_sentences(others, lib)
    both = keys[0].keys() & keys[1].keys()
    pools = [tuple(sorted(v for k, v in pool.items() if k not in both)) for pool in keys]
    pools.append(tuple(sorted(v for k, v in distractors.items() if k not in keys[0] and k not in keys[1])))
    for name, pool, least in zip((*CLASS_NAMES, "distractor"), pools, (MIN_KEY_POOL, MIN_KEY_POOL, MIN_DISTRACTORS)):
        if len(pool) < least:
            raise ValueError(f"the {name} pool of {lib} holds {len(pool)} sentences, fewer than {least}: "
                             f"this Python's standard library has too few docstrings for the stdlib text data")
    return tuple(pools)


# ----------------------------------------------------------------------------- synthetic sentences

def synthetic_pools(seed: int, num_topics: int = 4, topic_words: int = 20, noise_words: int = 100,
                    noise: float = 0.5, pool_size: int = 400) -> tuple:
    """(class-0 key sentences, class-1 key sentences, distractors) of the synthetic setting
    (module docstring); each topic's pool has pool_size distinct sentences."""
    for name, v in (("num_topics", num_topics), ("topic_words", topic_words), ("noise_words", noise_words),
                    ("pool_size", pool_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must lie in [0, 1), got {noise}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    noise_vocab = [f"nw{i}" for i in range(noise_words)]
    pools = [_topic_sentences([f"t{t}w{i}" for i in range(topic_words)], noise_vocab, noise, pool_size, rng)
             for t in range(2 + num_topics)]
    return pools[0], pools[1], tuple(s for pool in pools[2:] for s in pool)


def _topic_sentences(vocab: list, noise_vocab: list, noise: float, count: int, rng) -> tuple:
    found, tries = {}, 0
    while len(found) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"cannot draw {count} distinct sentences from {len(vocab)} topic words; "
                             f"lower pool_size or raise topic_words")
        length = int(rng.integers(6, 15))
        from_topic = rng.random(length) >= noise
        ws = [vocab[rng.integers(len(vocab))] if t else noise_vocab[rng.integers(len(noise_vocab))]
              for t in from_topic]
        s = " ".join(ws).capitalize() + "."
        found.setdefault(s, None)
    return tuple(found)


# ----------------------------------------------------------------------------- documents

def split_pool(pool: Sequence[str], rng: np.random.Generator) -> tuple:
    """A random half of `pool` (train) and the rest (test): disjoint, sizes floor/ceil of len/2."""
    perm = rng.permutation(len(pool))
    half = len(pool) // 2
    return [pool[i] for i in perm[:half]], [pool[i] for i in perm[half:]]


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) labels in {0, 1}, every consecutive pair (2i, 2i+1) one of each, in random order."""
    pairs = np.stack([rng.permutation(2) for _ in range((n + 1) // 2)]) if n else np.zeros((0, 2), np.int64)
    return pairs.reshape(-1)[:n].astype(np.int64)


def compose(keys: Sequence[Sequence[str]], distractors: Sequence[str], n: int, groups: int, segments: int,
            rng: np.random.Generator) -> tuple:
    """n documents: the sentence table, sentence rows (n, G, S), y, key_group, key_segment (numpy)."""
    table = list(distractors) + [s for pool in keys for s in pool]
    offsets = [len(distractors), len(distractors) + len(keys[0])]
    y = balanced_labels(n, rng)
    rows = rng.integers(0, len(distractors), (n, groups, segments))
    key_group, key_segment = rng.integers(0, groups, n), rng.integers(0, segments, n)
    for c in (0, 1):
        sel = np.nonzero(y == c)[0]
        rows[sel, key_group[sel], key_segment[sel]] = offsets[c] + rng.integers(0, len(keys[c]), len(sel))
    return table, rows, y, key_group, key_segment


def build_split(keys, distractors, n: int, groups: int, segments: int, max_words: int, buckets: int,
                rng: np.random.Generator) -> TextDataset:
    """Compose n documents and hash their words; only the sentences used are encoded."""
    table, rows, y, key_group, key_segment = compose(keys, distractors, n, groups, segments, rng)
    used, inverse = np.unique(rows, return_inverse=True)
    sentences = tuple(table[i] for i in used)
    ids = encode_segments(sentences, max_words, buckets)
    index = torch.from_numpy(inverse.reshape(rows.shape).astype(np.int64))
    return TextDataset(ids[index], torch.from_numpy(y), torch.from_numpy(key_group.astype(np.int64)),
                       torch.from_numpy(key_segment.astype(np.int64)), index, sentences, buckets)


def make_text_documents(setting: str, n_train: int, n_test: int, seed: int = 0, *, groups: int = 4,
                        segments: int = 6, max_words: int = 24, buckets: int = 8192, **setting_kw) -> tuple:
    """(train, test) TextDatasets of `setting` ("stdlib" or "synthetic"): n documents of `groups`
    paragraphs of `segments` sentences, each sentence's first max_words words hashed into
    `buckets` buckets.  setting_kw go to synthetic_pools (synthetic) or stdlib_pools (lib=)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown text setting {setting!r}; expected one of {SETTINGS}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    n_train, n_test = check_count("n_train", n_train), check_count("n_test", n_test)
    for name, v in (("groups", groups), ("segments", segments)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    pools = stdlib_pools(**setting_kw) if setting == "stdlib" else synthetic_pools(seed, **setting_kw)
    split_ss, train_ss, test_ss = np.random.SeedSequence([seed, 2]).spawn(3)
    rng = np.random.default_rng(split_ss)
    halves = [split_pool(pool, rng) for pool in pools]  # [(train, test)] for key 0, key 1, distractors
    splits = []
    for part, ss in ((0, train_ss), (1, test_ss)):
        keys, distractors = [halves[0][part], halves[1][part]], halves[2][part]
        splits.append(build_split(keys, distractors, (n_train, n_test)[part], groups, segments, max_words, buckets,
                                  np.random.default_rng(ss)))
    return tuple(splits)
