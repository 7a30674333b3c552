"""lima-core."""
