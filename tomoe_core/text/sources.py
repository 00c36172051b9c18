"""Calibration and evaluation text: the default Wikipedia extract, local files, HF datasets.

The default corpus is the Wikipedia extract shipped with gensim (CC BY-SA), split by
article, never by token: an article goes to the held-out part when a stable hash of its
title falls in the held-out bucket, so the split is the same on every machine.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..infra.locations import cache_dir
from .reading import TextSourceError, read_utf8
from .treebank import is_conllu, read_conllu

DEFAULT_CORPUS = "wiki"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_FRACTION = 0.2  # 18 of the 106 articles, about 95 k SmolLM2 tokens


@dataclass(frozen=True)
class Document:
    doc_id: int
    title: str
    text: str


def _heldout(title: str) -> bool:
    digest = hashlib.sha1(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2 ** 32 < HELDOUT_FRACTION


def _wiki_articles() -> list[tuple[str, str]]:
    import bz2
    import re

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    articles = []
    with bz2.open(datapath(_WIKI_FILE), "rb") as fh:
        for title, markup, _pageid in extract_pages(fh):
            if ":" in title or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(markup)
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text.split()) >= 50:
                articles.append((title, text))
    return articles


def load_documents(source: str = DEFAULT_CORPUS, split: str = "heldout") -> list[Document]:
    """Documents of a text source.

    source: "wiki" (the default corpus; split "calibration" or "heldout"), a `.txt` file
    (one document per blank-line-separated block), a folder of `.txt` files (one document
    each), or "hf:NAME[:CONFIG]" for a Hugging Face `datasets` corpus (split = its split).
    """
    if source == DEFAULT_CORPUS:
        if split not in ("calibration", "heldout"):
            raise TextSourceError(f"split {split!r} of the default corpus: use 'calibration' or 'heldout'")
        keep = (lambda t: _heldout(t)) if split == "heldout" else (lambda t: not _heldout(t))
        docs = [(t, x) for t, x in _wiki_articles() if keep(t)]
    elif source.startswith("hf:"):
        docs = _hf_documents(source[3:], split)
    else:
        docs = _file_documents(Path(source))
    if not docs:
        raise TextSourceError(f"text source {source!r} ({split}) has no text")
    return [Document(i, t, x) for i, (t, x) in enumerate(docs)]


def _file_documents(path: Path) -> list[tuple[str, str]]:
    if is_conllu(path) and not path.is_file():
        raise TextSourceError(f"CoNLL-U file {path} does not exist; pass an existing .conllu treebank file")
    if path.is_dir():
        files = sorted(path.glob("**/*.txt"))
        if not files:
            raise TextSourceError(f"folder {path} holds no .txt files")
        return [(str(f.relative_to(path)), t) for f in files if (t := read_utf8(f).strip())]
    if is_conllu(path):  # a UD treebank: its documents, gold words aside
        return [(doc.title, doc.text) for doc in read_conllu(path)]
    if path.is_file():
        blocks = [b.strip() for b in read_utf8(path).split("\n\n")]
        return [(f"{path.name}#{i}", b) for i, b in enumerate(blocks) if b]
    raise TextSourceError(f"text source {str(path)!r} is not '{DEFAULT_CORPUS}', 'hf:NAME', "
                          "an existing .txt file or a folder of .txt files")


def _hf_documents(spec: str, split: str) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise TextSourceError("`hf:` text sources need the `datasets` package: pip install datasets") from None
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split if split != "heldout" else "test")
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [(f"{name}#{i}", t) for i, t in enumerate(ds[column]) if t and t.strip()]


def token_stream(tokenizer, docs: list[Document], max_tokens: int | None = None) -> torch.Tensor:
    """Documents tokenised and joined with the EOS token between them. -> (n_tokens,) int64.

    No special prefix (BOS) here: `windows` puts it at the start of every window, never mid-window."""
    import torch

    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    out = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    if out.numel() == 0:
        raise TextSourceError("the text produced no tokens")
    return out


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before every text: [bos] for Gemma, Llama, Mistral; [] for SmolLM2,
    GPT-2, Qwen. Every window and prompt the model sees starts with these, as in the model's own use."""
    probe = "Hello world, this is a test."
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    # the specials changed how the text itself is split (rare): trust the tokenizer's flag
    bos = tokenizer.bos_token_id
    return [bos] if getattr(tokenizer, "add_bos_token", False) and bos is not None else []


def encode_text(tokenizer, text: str) -> list[int]:
    """One text as the model sees it in use: the tokenizer's special prefix (e.g. BOS), then the text."""
    return special_prefix(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def windows(stream: torch.Tensor, length: int, max_windows: int | None = None,
            prefix: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens: `prefix` (the tokenizer's BOS, if any; see
    `special_prefix`) then `length - len(prefix)` tokens of the stream. The tail is dropped. -> (n, length)"""
    import torch

    body = length - len(prefix)
    if body < 1:
        raise TextSourceError(f"windows of {length} tokens leave no room for text after the {len(prefix)} prefix tokens")
    n = stream.numel() // body
    if n == 0:
        raise TextSourceError(f"text has {stream.numel()} tokens, fewer than one window of {length}")
    if max_windows is not None:
        n = min(n, max_windows)
    out = stream[: n * body].view(n, body)
    if prefix:
        out = torch.cat([torch.tensor(list(prefix), dtype=out.dtype).expand(n, -1), out], dim=1)
    return out


def text_windows(tokenizer, source: str, split: str, tag: str, length: int,
                 max_windows: int | None = None) -> torch.Tensor:
    """Windows of a text source as the model expects them (its special prefix first). -> (n, length)"""
    return windows(cached_stream(tokenizer, source, split, None, tag), length, max_windows,
                   special_prefix(tokenizer))


def cached_stream(tokenizer, source: str, split: str, max_tokens: int | None, tag: str) -> torch.Tensor:
    """Token stream cached under cache/tokens (tokenising the wiki extract takes ~20 s)."""
    import io

    import torch

    from ..infra.workspace import safe_name
    from ..moe.atomic import atomic_write_bytes

    key = f"{safe_name(tag)}-{safe_name(source)}-{split}-{max_tokens}-h{HELDOUT_FRACTION}"
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a corrupt cache entry is rebuilt, not trusted
            path.unlink(missing_ok=True)
    stream = token_stream(tokenizer, load_documents(source, split), max_tokens)
    buf = io.BytesIO()
    torch.save(stream, buf)
    atomic_write_bytes(path, buf.getvalue())
    return stream
