"""TODO: evaluation."""
