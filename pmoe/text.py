"""The segment front end: text -> (B, n, d) segment vectors for `pmoe.PMoE` (and (B, G, S, d) for
`pmoe.HierarchicalPMoE`).  Nothing is downloaded: there is no trained tokenizer and no stored
vocabulary.

    ids = encode_segments(split_sentences(text), max_words=24, buckets=8192)   # (n, 24) int64
    emb = SegmentEmbedding(buckets=8192, dim=32)
    x = emb(ids[None])                                                          # (1, n, 32)

- Words: lowercase runs of letters and digits (`words`).
- Hashed word vocabulary: word -> 1 + (BLAKE2b of its UTF-8 bytes mod (buckets - 1)); id 0 is
  padding.  The hash is stable across processes and machines (python's own hash() is salted).
  Different words may share a bucket; with 8192 buckets and a few thousand word types that is
  rare, and it is what every hashed-feature model accepts.
- Segments: sentences (`split_sentences`) or fixed-length word windows ("n-grams", `word_windows`).
  A segment keeps its first max_words words (`encode_segments` pads with 0).
- Embedding (`SegmentEmbedding`): learned, one d-vector per bucket; a segment's vector is the
  mean of its words' vectors (0 for an all-padding segment).  It is a lookup and a mean: no
  multiply-adds, so FlopCounterMode counts nothing for it (its cost is memory traffic, about
  T*d additions per segment, the same for every model that reads all segments).
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence, Union

import torch
from torch import nn

_WORD = re.compile(r"[a-z0-9]+")
# a sentence ends at . ! or ? followed by white space and an upper-case letter (or the end)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def words(text: str) -> list[str]:
    """Lowercase words of `text`: maximal runs of ASCII letters and digits."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def split_sentences(text: str) -> list[str]:
    """`text` cut after every '.', '!' or '?' that white space and an upper-case letter follow;
    white space is collapsed and empty pieces dropped."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    pieces = _SENTENCE_END.split(" ".join(text.split()))
    return [p for p in pieces if p]


def word_windows(tokens: Sequence[str], width: int) -> list[list[str]]:
    """Consecutive non-overlapping windows of `width` words (fixed-length n-grams); the last one
    may be shorter.  An empty token list gives no windows."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    tokens = list(tokens)
    return [tokens[i:i + width] for i in range(0, len(tokens), width)]


def hash_word(word: str, buckets: int) -> int:
    """The word's bucket in [1, buckets): 1 + BLAKE2b-64(word) mod (buckets - 1).  0 is padding."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2:
        raise ValueError(f"buckets must be an int >= 2 (bucket 0 is padding), got {buckets!r}")
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def encode_segments(segments: Sequence[Union[str, Sequence[str]]], max_words: int, buckets: int) -> torch.Tensor:
    """(n, max_words) int64 hashed word ids, one row per segment, 0-padded; a segment is a string
    (split by `words`) or an already split list of words; words past max_words are dropped."""
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be a positive int, got {max_words!r}")
    out = torch.zeros(len(segments), max_words, dtype=torch.int64)
    for i, seg in enumerate(segments):
        toks = words(seg) if isinstance(seg, str) else list(seg)
        ids = [hash_word(w, buckets) for w in toks[:max_words]]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


class SegmentEmbedding(nn.Module):
    """Learned segment vectors: ids (..., T) int64 -> (..., dim), the mean of the non-padding
    words' embeddings (0 where a segment has no words).

    weight: (buckets, dim), N(0, 1) like nn.Embedding, row 0 (padding) fixed at 0.
    """

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        for name, v in (("buckets", buckets), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.embedding = nn.Embedding(buckets, dim, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise TypeError(f"ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() < 1:
            raise ValueError("ids need a last (words) axis")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.embedding.num_embeddings):
            raise ValueError(f"ids must lie in [0, {self.embedding.num_embeddings}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        count = (ids != 0).sum(-1, keepdim=True).clamp_min(1)
        return self.embedding(ids).sum(-2) / count  # padding rows are 0, so the sum skips them
