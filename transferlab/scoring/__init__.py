"""TODO: scoring."""
