"""TODO: tuning."""
