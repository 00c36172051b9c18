"""`Masks`: the masks (or mask logits) of every layer of a `MaskedModel`, by kind.

Legend: L = layers, E = experts, I = intermediate channels, P = rotary pairs, C = value channels.

    mlp  L x (E, I)  MLP expert masks
    qk   L x (1, P)  Q/K rotary-pair masks (static: one per layer)   } attention pruning only,
    vo   L x (E, C)  V/O expert masks                                } empty otherwise

A `Masks` is also the flat sequence mlp + qk + vo (L or 3 L tensors, in that order), which is what
the engine took before this type existed: `len`, indexing and iteration see that sequence, and
`Masks.of` reads such a list back (tests and benchmarks still build plain lists).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True, eq=False)
class Masks(Sequence):
    mlp: tuple[torch.Tensor, ...]
    qk: tuple[torch.Tensor, ...] = ()
    vo: tuple[torch.Tensor, ...] = ()

    def __post_init__(self):
        for name in ("mlp", "qk", "vo"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.qk) != len(self.vo) or self.qk and len(self.qk) != len(self.mlp):
            raise ValueError(f"masks of {len(self.mlp)} MLP layers, {len(self.qk)} Q/K and {len(self.vo)} V/O: "
                             "attention masks come for every layer or for none")

    @classmethod
    def of(cls, masks: "Masks | Sequence[torch.Tensor]", layers: int) -> "Masks":
        """`masks` as Masks: a Masks as it is, or a flat list of L (MLP only) or 3 L tensors."""
        if isinstance(masks, Masks):
            return masks
        masks = list(masks)
        if len(masks) == layers:
            return cls(masks)
        if len(masks) != 3 * layers:
            raise ValueError(f"{len(masks)} masks for {layers} layers: expected {layers} (MLP) or {3 * layers} "
                             "(MLP, Q/K, V/O)")
        return cls(masks[:layers], masks[layers:2 * layers], masks[2 * layers:])

    @property
    def attention(self) -> bool:
        """Whether the attention is masked too (qk and vo present)."""
        return bool(self.qk)

    @property
    def routed(self) -> list[torch.Tensor]:
        """The masks that have experts (MLP and V/O), in that order."""
        return list(self.mlp) + list(self.vo)

    def map(self, fn: Callable[..., torch.Tensor], *others: "Masks") -> "Masks":
        """fn applied tensor by tensor (with the same tensor of each of `others` as further arguments),
        in flat order: mlp, then qk, then vo."""
        groups = zip((self.mlp, self.qk, self.vo), *((o.mlp, o.qk, o.vo) for o in others))
        return Masks(*(tuple(fn(*ts) for ts in zip(*group)) for group in groups))

    # the flat sequence mlp + qk + vo
    def _flat(self) -> tuple[torch.Tensor, ...]:
        return self.mlp + self.qk + self.vo

    def __len__(self) -> int:
        return len(self.mlp) + len(self.qk) + len(self.vo)

    def __getitem__(self, index):
        return self._flat()[index]

    def __iter__(self):
        return iter(self._flat())
