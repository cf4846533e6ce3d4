"""Analyses across runs and sweeps (read back from MLflow)."""
