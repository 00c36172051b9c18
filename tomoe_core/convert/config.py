"""The settings of a conversion: `ConversionConfig`, its derived defaults and its validation.

Torch-free, so the command line and the studio can read and check settings without loading the engine.
Each field carries its `convert` option (flags, help, argparse group) in its metadata, declared with
`option(...)`, or says why it has none with `internal(...)`; `cli.py` builds the options from these, so a
new setting cannot be left out of the command line by accident. Fields are declared in the order
`convert --help` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .generation_budget import default_train_gap
from .generation_budget import train_budget as _train_budget

# `convert --help` groups, in the order it shows them
ESSENTIALS = "essentials"
RECIPE = "training recipe"
ADVANCED = "advanced / research"
GROUPS = {
    ESSENTIALS: None,
    RECIPE: "how the hypernetwork and routers are trained",
    ADVANCED: "the objective, the initialisation, the mask noise and other knobs for experiments",
}

BUDGET_SAMPLING = ("uniform", "log", "inverse")
DEFAULT_BUDGET_SAMPLING = "log"  # of a budget range; conversions saved before the option existed used "uniform"
INITS = ("cluster", "layerwise", "offset")
REGULARISE = ("deterministic", "sampled")
DISTILL = ("kl", "ce")

def option(default, group: str, *flags: str, help: str, **argparse_kwargs):
    """A field with a `convert` option. flags: default `--field-name`; the type (and nargs for a tuple,
    store_true / store_false for a bool) comes from the field's annotation; argparse_kwargs: choices,
    metavar."""
    assert group in GROUPS, group
    return field(default=default, metadata={"cli": {"group": group, "flags": flags, "help": help,
                                                    **argparse_kwargs}})


def internal(default, why: str):
    """A field deliberately without a `convert` option (set it from Python)."""
    return field(default=default, metadata={"internal": why})


@dataclass
class ConversionConfig:
    # --- essentials
    model: str = option("smollm2-135m", ESSENTIALS,
                        help="built-in name (smollm2-135m, gemma3-270m), local HF checkpoint folder, .gguf file or "
                             "hub id (default: %(default)s)")
    text: str = option("wiki", ESSENTIALS,
                       help="calibration text: 'wiki' (default corpus), a .txt file, a folder, or hf:NAME")
    budget: float = option(0.5, ESSENTIALS, "--budget", "-p",
                           help="fraction of MLP parameters active per token, in (0, 1] (default: %(default)s)")
    budget_range: tuple[float, float] | None = option(
        None, ESSENTIALS, metavar=("LO", "HI"),
        help="train one budget-conditioned conversion for every budget in [LO, HI] (e.g. 0.3 1.0); --budget is "
             "then the one the saved model is materialised at, and `rebudget` materialises any other in seconds")
    num_experts: int = option(8, ESSENTIALS, "--experts", "-e", metavar="EXPERTS",
                              help="experts per layer (default: %(default)s)")
    prune_attention: bool = option(
        False, ESSENTIALS,
        help="the paper's second stage: also prune attention (static Q/K head dims in rotary pairs, per-token V/O "
             "experts); --budget then counts MLP + q/k/v/o projection weights (llama, mistral, qwen2 families)")
    # CPU default: about 30 min for SmolLM2-135M on 2 cores
    steps: int = option(400, ESSENTIALS, help="optimiser steps (default: %(default)s)")
    device: str = option("cpu", ESSENTIALS, help="cpu or cuda[:N] (default: %(default)s)")

    # --- training recipe
    tokens_per_step: int = option(512, RECIPE, help="calibration tokens per step (default: %(default)s)")
    # batch = tokens_per_step // seq_len windows
    seq_len: int = option(256, RECIPE, help="tokens per calibration window (default: %(default)s)")
    lr: float = option(1e-3, RECIPE, help="AdamW learning rate (default: %(default)s)")
    # None without a range; "log" and "inverse" spend more steps on low budgets, which have the most to learn
    budget_sampling: str | None = option(
        None, RECIPE, choices=BUDGET_SAMPLING,
        help="with --budget-range: how training steps spread over the range: uniform in p, log (uniform in log p) "
             f"or inverse (uniform in 1/p; most steps on low budgets) (default: {DEFAULT_BUDGET_SAMPLING})")
    checkpoint_every: int = option(50, RECIPE, help="steps between checkpoints (default: %(default)s)")

    # --- advanced / research
    # The paper's runs end this way too: their masks drift below the budget and the final calibration widens
    # them. The saved model is at `budget`. None: `default_train_gap`.
    train_gap: float | None = option(
        None, ADVANCED,
        help="single budget: train the experts for --budget minus this, then widen them to --budget by the mask "
             "threshold (default: 0.1 for budgets of 0.5 and more, where it measured better, 0 below and with "
             "--prune-attention; 0 trains at the budget itself; not with --budget-range, which calibrates its "
             "anchor instead)")
    lam: float = option(16.0, ADVANCED, help="budget penalty weight (default: %(default)s)")
    union_weight: float = option(3.0, ADVANCED, help="weight of the union-coverage term (default: %(default)s)")
    load_balance_weight: float = option(1.0, ADVANCED, help="weight of the load-balance term (default: %(default)s)")
    init: str = option("cluster", ADVANCED, choices=INITS,
                       help="cluster: routers and experts start from k-means clusters of each layer's MLP inputs; "
                            "layerwise: each layer's router and experts fitted in order to reconstruct its dense "
                            "MLP output (about 20 s per layer of SmolLM2-135M; a better start, see docs/RESULTS.md); "
                            "offset: the paper's init, all channels on (default: %(default)s)")
    init_balance: bool = option(True, ADVANCED, "--no-init-balance",
                                help="cluster init: keep k-means' unequal cluster sizes instead of giving every "
                                     "expert an equal share of the calibration tokens")
    # The prior is +s on each expert's channels, -s elsewhere. A large prior saturates the straight-through
    # sigmoid (slope ~ sigmoid'(s / mask_tau)), so the masks barely move from the k-means heuristic (+-3, the
    # first default: 4.6 % of the entries moved in 400 steps); a small one lets distillation reshape them.
    prior_scale: float = option(1.0, ADVANCED,
                                help="cluster init: magnitude of the experts' prior mask logits; smaller lets "
                                     "training move the masks further from the k-means heuristic "
                                     "(default: %(default)s)")
    # Noise of amplitude a flips a prior entry of +-s with probability 1 / (1 + exp(s / a)): a = s / 3 flips ~5 %
    # of them, as amplitude 1 did on the +-3 prior; amplitude 1 on a +-1 prior flips 27 % and costs quality at
    # every budget.
    mask_noise: float | None = option(
        None, ADVANCED,
        help="amplitude of the logistic mask noise at step 0 (default: --prior-scale / 3, or 1 with --init offset: "
             "noise that flips about 5 %% of the prior's entries)")
    noise_anneal: float = option(0.7, ADVANCED,
                                 help="mask noise decays to 0 over this fraction of the steps; 0 keeps it "
                                      "(default: %(default)s)")
    # deterministic: the deterministic masks cannot drift off budget while the noisy samples look fine
    regularise: str = option("deterministic", ADVANCED, choices=REGULARISE,
                             help="masks the budget and union terms see: the noise-free ones inference uses, or "
                                  "the noisy sampled ones as in the paper (default: %(default)s)")
    distill: str = option("kl", ADVANCED, choices=DISTILL,
                          help="kl: forward KL to the dense model; ce: next-token cross-entropy (default: %(default)s)")
    seed: int = option(0, ADVANCED, help="random seed (default: %(default)s)")
    micro_batches: int = option(1, ADVANCED,
                                help="split each step's batch into this many shards of data and noise; under "
                                     "torchrun the processes share them, so use a multiple of the process count "
                                     "(default: %(default)s)")

    # --- no option
    weight_decay: float = internal(0.05, "AdamW weight decay")
    mask_tau: float = internal(0.4, "temperature of the straight-through mask sigmoid")
    router_tau: float = internal(0.4, "temperature of the straight-through router softmax")
    offset: float = internal(3.0, "initial mask logit of --init offset (the paper's)")
    init_tokens: int = internal(8192, "calibration tokens of the cluster init's k-means")

    def __post_init__(self):
        self._fill_derived_defaults()
        self.validate()

    def _fill_derived_defaults(self) -> None:
        """The settings whose default depends on others (None: derive it)."""
        if self.budget_range is not None:
            self.budget_range = tuple(float(b) for b in self.budget_range)
        if self.train_gap is None:
            self.train_gap = default_train_gap(self.budget, self.budget_range, self.prune_attention)
        if self.budget_range is not None and self.budget_sampling is None:
            self.budget_sampling = DEFAULT_BUDGET_SAMPLING
        if self.mask_noise is None:
            self.mask_noise = (self.offset if self.init == "offset" else self.prior_scale) / 3

    def validate(self) -> None:
        """Raise ValueError, with what to change, for settings that cannot train."""
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if self.budget_range is not None:
            lo, hi = self.budget_range
            if not 0 < lo < hi <= 1:
                raise ValueError(f"budget range must satisfy 0 < lo < hi <= 1, got {lo} {hi}")
            if not lo <= self.budget <= hi:
                raise ValueError(f"budget {self.budget} (the one the saved model is materialised at) must lie "
                                 f"inside the budget range {lo} {hi}")
        if not 0 <= self.train_gap < self.budget:
            raise ValueError(f"train_gap must be >= 0 and below the budget {self.budget}, got {self.train_gap}")
        if self.train_gap and self.budget_range is not None:
            raise ValueError("train_gap is for single-budget conversions; a budget-conditioned one calibrates how "
                             "far below each budget to generate its experts after training (anchor calibration)")
        if self.budget_sampling is not None and self.budget_sampling not in BUDGET_SAMPLING:
            raise ValueError(f"budget_sampling must be one of {', '.join(BUDGET_SAMPLING)}, got {self.budget_sampling!r}")
        if self.budget_range is None and self.budget_sampling is not None:
            raise ValueError(f"budget sampling {self.budget_sampling!r} spreads steps over a budget range: "
                             "give one (--budget-range LO HI) or leave the sampling out")
        if self.prune_attention and self.budget_range is not None:
            raise ValueError("prune_attention does not support a budget range (budget-conditioned conversion) yet; "
                             "train attention pruning at one budget, or leave prune_attention off")
        if not self.prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {self.prior_scale}")
        if not self.mask_noise >= 0:
            raise ValueError(f"mask_noise must be >= 0, got {self.mask_noise}")
        if self.steps < 1 or self.tokens_per_step < self.seq_len:
            raise ValueError("steps must be >= 1 and tokens_per_step >= seq_len")
        if self.regularise not in REGULARISE:
            raise ValueError(f"regularise must be 'deterministic' or 'sampled', got {self.regularise!r}")
        if self.init not in INITS or self.distill not in DISTILL:
            raise ValueError(f"init must be one of {', '.join(INITS)} and distill one of {', '.join(DISTILL)}")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"micro_batches ({self.micro_batches}) must divide the batch of "
                             f"{self.batch_size} windows (tokens_per_step // seq_len)")

    @property
    def train_budget(self) -> float:
        """The budget a single-budget run trains its experts for (`budget - train_gap`, see generation_budget)."""
        return _train_budget(self.budget, self.train_gap)

    @property
    def batch_size(self) -> int:
        return self.tokens_per_step // self.seq_len
