"""``callbacks=drift``: how fast each layer's input statistics move, and how far the running
estimates used for normalization lag behind them (docs/drift.md).

The lecture's observation: in the first epochs E[x_i] and Var[x_i] of every layer's inputs
change very quickly, the running estimates (BN's running statistics, the whitening μ_i and α_i)
lag, and a stale estimate gives big unwarranted updates that push units into the flat region
of the ReLU. The package makes this visible for any model:

* ``collector``: the forward hooks and the statistics they gather on the device;
* ``probe``: the fixed probe set of training inputs;
* ``stats``: the statistics as pure functions, the schedule and the host summaries;
* ``monitor``: :class:`DriftMonitor`, the Lightning callback (``conf/callbacks/drift.yaml``);
* ``outputs``: the record of every scalar and the artifact files;
* ``figures``: the figures, from the artifacts alone (``scripts/plot_drift.py`` redraws them).
"""

from rescalelab.callbacks.drift.monitor import DriftMonitor

__all__ = ["DriftMonitor"]
