"""Conversion: settings (`config`), budgets (`generation_budget`, `accounting`), the hypernetwork, expert
masks, the masked model and its MLP/attention, training, materialising, and the conversion folder
(`folder`, torch-free). Imports nothing at package level, so `convert.config` and `convert.folder` load
without torch."""
