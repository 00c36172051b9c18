"""TODO convert."""
