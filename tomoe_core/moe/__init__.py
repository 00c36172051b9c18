"""The exported runtime: the Hugging Face classes of a converted model (`modeling`), the MoE layer and its
layouts (`layer`), pruned attention (`attention`), family adapters, gather kernels (C and Triton) and
crash-safe file writes (`files`). Imports nothing else from tomoe_core: `export --hub-ready` copies
exactly this folder (tests/test_imports.py keeps it so)."""
