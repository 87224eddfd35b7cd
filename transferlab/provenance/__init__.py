"""TODO: provenance."""
