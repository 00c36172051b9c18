"""Last-word accuracy: a LAMBADA-style task metric from held-out text, scored like an lm-eval loglikelihood task.

An item is a context of whole sentences from one paragraph of the held-out text, ending right before
the last word of its final sentence; the target is that word with its leading space (" word"). A
model gets the item right when greedy decoding reproduces every token of the target (lm-eval's
`is_greedy`, reported as `acc`); the target's log-likelihood is recorded too. Items are the same for
every model (chosen on words, not tokens) and for every variant of one model; the first N of a
larger set are the N-item set.

Encoding follows lm-eval 0.4's `_encode_pair` for causal models: the context is encoded as the model
sees any text (`data.encode_text`: the tokenizer's special prefix, e.g. BOS, then the text), the
target's tokens are those of context + target past the context's length.

    items = load_items()                                   # 200 items of the wiki held-out split, cached
    score = score_last_words(fn, encode_items(tokenizer, items))   # fn: ids -> logits, any variant
    score.accuracy, score.loglikelihood
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..infra.locations import cache_dir
from ..text.sources import DEFAULT_CORPUS, HELDOUT_FRACTION, Document, encode_text, load_documents

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids -> (B, T, V) logits

DEFAULT_ITEMS = 200
SEED = 0
MIN_LETTERS = 4  # a target is a word of at least this many letters: not "a", "of", "it"
MIN_SENTENCE_WORDS = 6  # words of the target's own sentence before the target: something to go on
MAX_CONTEXT_WORDS = 40  # whole preceding sentences of the paragraph are added while the context fits
RULE_VERSION = 1  # bump when the rule above changes: cached items and --reuse'd rows are then rebuilt

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")  # "... ends. Next" (not "i.e., the")
_TARGET = re.compile(r" ([A-Za-z]{%d,})\.$" % MIN_LETTERS)  # the last word, its space and the full stop
_NOT_PROSE = tuple("=#:*;|{!<")  # headings, lists, indented lines, tables and tags of the wiki extract


@dataclass(frozen=True)
class LastWordItem:
    context: str  # whole sentences of one paragraph, ending right before the target's space
    target: str  # " word"
    title: str  # the document it comes from

    def as_dict(self) -> dict:
        return asdict(self)


def rule() -> dict:
    """The item rule, recorded beside results so that rows built under another rule are told apart."""
    return {"version": RULE_VERSION, "seed": SEED, "min_letters": MIN_LETTERS,
            "min_sentence_words": MIN_SENTENCE_WORDS, "max_context_words": MAX_CONTEXT_WORDS}


def _sentence_spans(paragraph: str) -> list[tuple[int, int]]:
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(paragraph)]
    ends = [m.start() for m in _SENTENCE_END.finditer(paragraph)] + [len(paragraph)]
    return list(zip(starts, ends))


def candidate_items(docs: list[Document]) -> list[LastWordItem]:
    """Every item of the documents, in text order: one per prose sentence that ends in ' word.'."""
    out = []
    for doc in docs:
        for paragraph in doc.text.split("\n"):
            paragraph = paragraph.strip()
            if not paragraph or paragraph.startswith(_NOT_PROSE):
                continue
            spans = _sentence_spans(paragraph)
            for i, (start, end) in enumerate(spans):
                found = _TARGET.search(paragraph[start:end])
                if found is None:
                    continue
                cut = start + found.start()  # the context ends right before the target's space
                if len(paragraph[start:cut].split()) < MIN_SENTENCE_WORDS:
                    continue
                first = i  # add whole preceding sentences while the context stays within MAX_CONTEXT_WORDS
                while first > 0 and len(paragraph[spans[first - 1][0]:cut].split()) <= MAX_CONTEXT_WORDS:
                    first -= 1
                context = paragraph[spans[first][0]:cut]
                if len(context.split()) <= MAX_CONTEXT_WORDS:
                    out.append(LastWordItem(context=context, target=" " + found.group(1), title=doc.title))
    return out


def build_items(docs: list[Document], count: int, seed: int = SEED) -> list[LastWordItem]:
    """`count` items drawn from the documents with a fixed seed (fewer if the text has fewer); the first
    n of any draw are the n-item draw."""
    candidates = candidate_items(docs)
    random.Random(seed).shuffle(candidates)
    return candidates[:count]


def load_items(source: str = DEFAULT_CORPUS, split: str = "heldout", count: int = DEFAULT_ITEMS,
               seed: int = SEED) -> list[LastWordItem]:
    """The items of a text source's split (see `data.load_documents`), cached under cache/lastword/."""
    from ..infra.workspace import safe_name
    from ..moe.atomic import atomic_write_json

    key = f"{safe_name(source)}-{split}-n{count}-s{seed}-v{RULE_VERSION}-h{HELDOUT_FRACTION}"
    path = cache_dir() / "lastword" / f"{key}.json"
    if path.exists():
        try:
            return [LastWordItem(**row) for row in json.loads(path.read_text())["items"]]
        except (OSError, ValueError, TypeError, KeyError):  # a corrupt cache entry is rebuilt, not trusted
            path.unlink(missing_ok=True)
    items = build_items(load_documents(source, split), count, seed)
    atomic_write_json(path, {"source": source, "split": split, "rule": rule(), "items": [i.as_dict() for i in items]})
    return items


def write_lm_eval_task(items: list[LastWordItem], folder: Path, task: str = "tomoe_lastword") -> Path:
    """The items as a local lm-eval task (`lm_eval --tasks TASK --include_path FOLDER`): its `acc` is
    `score_last_words`' accuracy and exp(-mean loglikelihood) its `perplexity`. Returns the YAML path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps({"context": i.context, "target": i.target}) + "\n" for i in items))
    yaml = folder / f"{task}.yaml"
    yaml.write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
                    "test_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{context}}\"\n"
                    "doc_to_target: \"{{target}}\"\nmetric_list:\n"
                    "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
                    "  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    return yaml


# -- scoring ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedItem:
    context: tuple[int, ...]  # the tokenizer's special prefix, then the context's tokens
    target: tuple[int, ...]  # the target's tokens (at least one)


def encode_items(tokenizer, items: list[LastWordItem]) -> list[EncodedItem]:
    out = []
    for item in items:
        context = encode_text(tokenizer, item.context)
        whole = encode_text(tokenizer, item.context + item.target)
        assert len(whole) > len(context), f"target {item.target!r} encodes to no tokens after its context"
        out.append(EncodedItem(tuple(context), tuple(whole[len(context):])))
    return out


@dataclass
class LastWordScore:
    accuracy: float  # fraction of items whose every target token is the greedy choice
    loglikelihood: float  # mean over items of the target's log-likelihood (nats, summed over its tokens)
    items: int
    correct: list[bool]
    loglikelihoods: list[float]
    seconds: float

    def fields(self) -> dict:
        """The fields a result row carries."""
        return {"last_word_accuracy": self.accuracy, "last_word_items": self.items,
                "last_word_loglikelihood": self.loglikelihood}


@torch.no_grad()
def score_last_words(fn: LogitsFn, encoded: list[EncodedItem], device: str | torch.device = "cpu",
                     batch_tokens: int = 2048, pad_id: int = 0) -> LastWordScore:
    """Greedy accuracy and log-likelihood of every item's target under `fn` ((B, T) ids -> (B, T, V) logits).

    Items are sorted by length and batched up to `batch_tokens` tokens, padded on the right: a causal
    model's logits before the padding do not depend on it, and pad_id is never scored."""
    assert encoded, "no items to score"
    t0 = time.time()
    seqs = [list(e.context + e.target)[:-1] for e in encoded]  # the last target token is never an input
    order = sorted(range(len(encoded)), key=lambda i: -len(seqs[i]))
    correct, lls = [False] * len(encoded), [0.0] * len(encoded)
    start = 0
    while start < len(order):
        width = len(seqs[order[start]])  # the longest of this batch (sorted longest first)
        stop = min(len(order), start + max(1, batch_tokens // width))
        batch = order[start:stop]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
        for row, i in enumerate(batch):
            ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
        logits = fn(ids.to(device))  # (B, T, V)
        for row, i in enumerate(batch):
            first = len(encoded[i].context) - 1  # the position that predicts the first target token
            target = torch.tensor(encoded[i].target, device=logits.device)  # (K,)
            logp = F.log_softmax(logits[row, first:first + len(target)].float(), -1)  # (K, V)
            lls[i] = float(logp.gather(1, target[:, None]).sum())
            correct[i] = bool((logp.argmax(-1) == target).all())
        start = stop
    return LastWordScore(accuracy=sum(correct) / len(correct), loglikelihood=sum(lls) / len(lls), items=len(encoded),
                         correct=correct, loglikelihoods=lls, seconds=time.time() - t0)
