"""TODO trace."""
