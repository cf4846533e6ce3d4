"""Analysis of finished runs and sweeps: everything that reads MLflow back.

- :mod:`.mlflow_read` — the one reader (a sweep's children, every page; histories in step order;
  artifacts; the sweep directory or run id a command names); :mod:`.child` — the one record of a
  child run; :mod:`.keys` — the one metric-key cleaner.
- :mod:`.sweep_report` — the sweep report (:mod:`.sweep_stats` its numbers, :mod:`.figures` its
  figures, :mod:`.report_cli` the ``rescalelab-report`` command); :mod:`.summary` records a
  sweep's answer on its parent run and prints it.
- :mod:`.theory_report` — the theory presets' report (:mod:`.theory_stats` its numbers).
- :mod:`.compare` — runs and sweeps side by side (``rescalelab-compare``).
- Pure functions (no MLflow, no plotting): :mod:`.tuneability`, :mod:`.profiles`;
  :mod:`.budget` draws an equal, quasi-random tuning budget for every method (a Hydra sweeper).
"""
