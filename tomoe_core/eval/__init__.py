"""TODO eval."""
