"""TODO: reporting."""
