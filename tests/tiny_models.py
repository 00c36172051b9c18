"""Tiny randomly initialised models of every supported family, built from configs (no download)."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)
TINY_CONFIGS = {
    "llama": dict(COMMON, num_key_value_heads=2),
    "mistral": dict(COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(COMMON, num_key_value_heads=2),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=16, layer_types=None),
    "phi3": dict(COMMON, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi": dict(COMMON, num_key_value_heads=4, partial_rotary_factor=0.5),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=48),
}
FAMILIES = tuple(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0, vocab_size: int | None = None):
    """vocab_size: pass the real tokenizer's size (49152 for SmolLM2) to run on real text."""
    torch.manual_seed(seed)
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    cfg = AutoConfig.for_model(family, **{**TINY_CONFIGS[family], **overrides})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Perturb norm weights and biases so that an adapter bug cannot hide behind ones/zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


# Whether each family's released tokenizers start a text with BOS (Llama-2/3, Mistral and Gemma do;
# Qwen, Phi-2, GPT-2 and Phi-3's current tokenizer do not). The engine must follow the tokenizer.
FAMILY_ADDS_BOS = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False, "gemma3_text": True,
                   "phi3": False, "phi": False, "gpt2": False}
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def tiny_tokenizer(adds_bos: bool):
    """A word-level fast tokenizer over VOCAB ids (no download): specials, punctuation, then words
    ("w5") and the words of tiny_text(). `adds_bos` puts <bos> before every text, as Llama's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = _SPECIALS + list(".,;:!?'\"") + TINY_WORDS
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    vocab = {w: i for i, w in enumerate(words[:VOCAB])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")


TINY_WORDS = ("the cat sat on mat dog barked a loudly at it did not move and children ran fast home "
              "alice wrote three short letters to her friends in paris they answered quickly thanks").split()
