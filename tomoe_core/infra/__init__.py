"""TODO infra."""
