"""Calibration / evaluation text for ZipLM pruning.

Everything here is offline.  The built-in corpus is the shortened English
Wikipedia dump that ships inside gensim's test data
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
~1.7 MB bz2, ~100 real articles).  It is parsed with gensim's wikicorpus
utilities (``extract_pages`` + ``filter_wiki``) and cleaned into natural text:
case and punctuation are kept (LM perplexity needs real text), while headings,
list items, table rows, captions and reference sections are dropped.

Fixed held-out split (by article, never by paragraph)
------------------------------------------------------
An article belongs to the ``"eval"`` split iff

    int(sha256(("ziplm-wiki-split-v1:" + title).encode()).hexdigest()[:8], 16) % 100 < 10

and to ``"train"`` (the calibration pool) otherwise.  The hash is hashlib's
(stable across processes and Python versions, unlike ``hash()``); membership of
an article does not depend on the other articles.  Within each split the
articles are ordered by that same hash value (ties by title), so the order is
deterministic too.  See :func:`wiki_split`.

The parsed corpus is cached as JSON under ``$ZIPLM_CACHE_DIR`` (default
``$XDG_CACHE_HOME/ziplm_ext`` or ``~/.cache/ziplm_ext``), keyed by the dump's
size and mtime and by :data:`CLEAN_VERSION`.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Sequence

import torch

from ziplm_ext.io.fileio import atomic_write_bytes

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: bump when the cleaning rules change (invalidates the cache)
CLEAN_VERSION = 1
SPLIT_SALT = "ziplm-wiki-split-v1:"
EVAL_PERCENT = 10
#: articles with less cleaned text than this are dropped
MIN_ARTICLE_CHARS = 500
#: paragraphs shorter than this (after cleaning) are dropped
MIN_PARAGRAPH_CHARS = 80

# Sections after which an article holds no more prose.
_STOP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes",
    "bibliography", "sources", "footnotes", "citations", "notes and references",
    "works cited", "primary sources", "secondary sources",
}
_HEADING = re.compile(r"^\s*(={2,})\s*(.*?)\s*\1\s*$")
_NON_PROSE_START = ("*", "#", ";", ":", "|", "!", "{", "}", "<", "[", "✔", "✘")
_BOLD_ITALIC = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)\]])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]*\s*\)")
_PAREN_LEAD = re.compile(r"\(\s*[,;]+\s*")  # "(;, Akhilleus,)" -> "(Akhilleus)" (templates removed by filter_wiki)
_PAREN_TRAIL = re.compile(r"\s*[,;]+\s*\)")
_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")

_last_parse_seconds: float | None = None


# --------------------------------------------------------------------------
# Wikipedia corpus
# --------------------------------------------------------------------------
def wiki_dump_path() -> str:
    """Absolute path of the shortened enwiki dump shipped with gensim."""
    try:
        from gensim.test.utils import datapath
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the built-in Wikipedia corpus needs gensim (pip install gensim)") from e
    path = datapath(WIKI_FILE)
    if not os.path.isfile(path):  # pragma: no cover
        raise FileNotFoundError(f"gensim test corpus not found: {path}")
    return path


def cache_dir() -> Path:
    env = os.environ.get("ZIPLM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ziplm_ext"


def _clean_paragraph(lines: list[str]) -> str:
    text = " ".join(s.strip() for s in lines)
    text = _BOLD_ITALIC.sub("", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _PAREN_LEAD.sub("(", text)
    text = _PAREN_TRAIL.sub(")", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = text.replace("( ", "(").replace(" )", ")")
    return text.strip()


def clean_wiki_text(filtered: str) -> list[str]:
    """Turn ``gensim.corpora.wikicorpus.filter_wiki`` output into prose paragraphs.

    Keeps case and punctuation.  Drops headings, list items, table/template
    remnants, image captions (short lines without final punctuation) and
    everything from a "References"/"See also"/... heading on.
    """
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            p = _clean_paragraph(current)
            current.clear()
            if len(p) >= MIN_PARAGRAPH_CHARS and p[-1] in ".!?\"')" and " " in p:
                paragraphs.append(p)

    for raw in filtered.split("\n"):
        line = raw.strip()
        if not line:
            flush()
            continue
        h = _HEADING.match(line)
        if h:
            flush()
            if h.group(2).strip().lower() in _STOP_SECTIONS:
                break
            continue
        if line.startswith(_NON_PROSE_START) or line.startswith("="):
            flush()
            continue
        current.append(line)
    flush()
    return paragraphs


def _parse_dump(path: str) -> list[dict]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(path) as fh:
        for title, text, _pageid in extract_pages(fh):  # namespace 0 (articles) only
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            if title.endswith("(disambiguation)"):
                continue
            paras = clean_wiki_text(filter_wiki(text))
            body = "\n\n".join(paras)
            if len(body) < MIN_ARTICLE_CHARS:
                continue
            articles.append({"title": title, "text": body})
    return articles


def wiki_articles(use_cache: bool = True) -> list[dict]:
    """All cleaned articles as ``[{"title": str, "text": str}, ...]`` in dump order.

    ``text`` is the article's prose paragraphs joined by blank lines.
    """
    global _last_parse_seconds
    path = wiki_dump_path()
    st = os.stat(path)
    cache_file = cache_dir() / f"enwiki_short_{st.st_size}_{int(st.st_mtime)}_v{CLEAN_VERSION}.json"
    if use_cache and cache_file.is_file():
        try:
            with open(cache_file, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, list) and data and all("title" in a and "text" in a for a in data):
                return data
        except (OSError, ValueError):
            pass  # corrupt cache: re-parse
    t0 = time.perf_counter()
    articles = _parse_dump(path)
    _last_parse_seconds = time.perf_counter() - t0
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # atomic: concurrent readers never see half a file
            atomic_write_bytes(cache_file, json.dumps(articles, ensure_ascii=False).encode("utf-8"))
        except OSError:
            pass  # read-only home etc.: just don't cache
    return articles


def last_parse_seconds() -> float | None:
    """Seconds the last uncached parse took in this process (None if served from cache)."""
    return _last_parse_seconds


def wiki_texts() -> list[str]:
    """All cleaned article texts (one string per article, paragraphs separated by blank lines)."""
    return [a["text"] for a in wiki_articles()]


def _split_key(title: str) -> int:
    return int(hashlib.sha256((SPLIT_SALT + title).encode("utf-8")).hexdigest()[:8], 16)


def article_split(title: str) -> str:
    """``"eval"`` or ``"train"`` for an article title (see module docstring)."""
    return "eval" if _split_key(title) % 100 < EVAL_PERCENT else "train"


def wiki_split_articles(split: str) -> list[dict]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    arts = [a for a in wiki_articles() if article_split(a["title"]) == split]
    arts.sort(key=lambda a: (_split_key(a["title"]), a["title"]))
    return arts


def wiki_split(split: str) -> list[str]:
    """Article texts of the fixed ``"train"`` (calibration, ~90%) or ``"eval"`` (held-out, ~10%) split."""
    return [a["text"] for a in wiki_split_articles(split)]


# --------------------------------------------------------------------------
# Tokenisation helpers
# --------------------------------------------------------------------------
def _doc_separator(tokenizer) -> int | None:
    for attr in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            return tid
    return None


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    # verbose=False silences the "sequence longer than model max length" warning:
    # we cut the stream into blocks ourselves.
    enc = tokenizer(list(texts), add_special_tokens=False, verbose=False)
    return enc["input_ids"]


def token_blocks(texts: Sequence[str], tokenizer, seq_len: int, num_blocks: int, seed: int = 0) -> torch.LongTensor:
    """``(num_blocks, seq_len)`` LongTensor of non-overlapping blocks of the token stream.

    The texts are tokenised without special tokens and concatenated in the
    given order with the tokenizer's EOS (else SEP) id between documents; the
    stream is cut into ``len // seq_len`` consecutive non-overlapping blocks and
    ``num_blocks`` of them are chosen with ``torch.Generator().manual_seed(seed)``
    (same inputs + seed -> same tensor).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("calibration data too small: no text given")
    if seq_len <= 0 or num_blocks <= 0:
        raise ValueError(f"seq_len and num_blocks must be positive, got {seq_len} and {num_blocks}")
    sep = _doc_separator(tokenizer)
    stream: list[int] = []
    for i, ids in enumerate(_encode(tokenizer, texts)):
        if i and sep is not None:
            stream.append(sep)
        stream.extend(ids)
    need = seq_len * num_blocks
    if len(stream) < need:
        raise ValueError(f"calibration data too small: {len(stream)} tokens, need {need} ({num_blocks} x {seq_len})")
    n_avail = len(stream) // seq_len
    blocks = torch.tensor(stream[: n_avail * seq_len], dtype=torch.long).view(n_avail, seq_len)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n_avail, generator=g)[:num_blocks]
    return blocks[idx].contiguous()


def split_sentences(text: str, min_words: int = 6) -> list[str]:
    """Heuristic sentence split of prose (period/!/? followed by a capital or digit)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in _SENT_SPLIT.split(para):
            s = s.strip()
            if len(s.split()) >= min_words:
                out.append(s)
    return out


def sentence_batches(texts: Sequence[str], tokenizer, max_len: int, num: int, seed: int = 0):
    """``(input_ids, attention_mask)`` for ``num`` sentences drawn from ``texts`` (encoder calibration).

    Texts are split into sentences (>= 6 words); ``num`` of them are sampled
    with ``random.Random(seed)`` (deterministic), tokenised with the
    tokenizer's special tokens ([CLS] ... [SEP] for BERT), truncated to
    ``max_len`` and right-padded to the longest one.  Both tensors are
    LongTensors of shape ``(num, L)`` with ``L <= max_len``.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("calibration data too small: no text given")
    if num <= 0 or max_len <= 0:
        raise ValueError(f"num and max_len must be positive, got {num} and {max_len}")
    sents = [s for t in texts for s in split_sentences(t)]
    if len(sents) < num:
        raise ValueError(f"calibration data too small: {len(sents)} sentences, need {num}")
    picked = random.Random(int(seed)).sample(sents, num)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
    enc = tokenizer(picked, max_length=max_len, truncation=True, padding="longest", return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


# --------------------------------------------------------------------------
# User text files
# --------------------------------------------------------------------------
def read_text_file(path) -> list[str]:
    """A UTF-8 text file -> list of documents (blocks separated by blank lines)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text file not found: {p}")
    if not p.is_file():
        raise ValueError(f"not a regular file: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not valid UTF-8 text (byte {e.start})") from None
    docs = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"text file is empty: {p}")
    return docs
