"""Evaluation: perplexity, KL, agreement and generation side by side (`metrics`), last-word accuracy
(`lastword`), static and per-token pruning baselines (`baselines`)."""
