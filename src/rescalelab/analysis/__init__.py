"""Analysis of finished sweeps: tuneability measures, performance profiles, the tuning budget.

Pure functions (no MLflow, no plotting) live in :mod:`.tuneability` and :mod:`.profiles`;
:mod:`.budget` draws an equal, quasi-random tuning budget for every method (a Hydra sweeper);
:mod:`.summary` records a sweep's answer on its parent run and prints it;
:mod:`.compare` puts runs and sweeps side by side (``rescalelab-compare``).
"""
