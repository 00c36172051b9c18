"""Workflows the CLI and the studio run, each on top of the engine's packages: a conversion run, anchor
calibration, rebudget (materialising at another budget), evaluation, shipping and hub-ready export."""
