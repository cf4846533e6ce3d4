"""The Lightning callbacks, one per ``conf/callbacks`` entry (each names one class here by
``_target_``). Most only measure (drift, stepsizes, train_eval, theory: they read through hooks
and log through the run's one logger); the divergence guard stops a run, the checkpoint callback
saves and handles signals; ``norm=bn_warmup`` brings the callback that switches its model
from BN to whitening (``bn_warmup.BnWarmupSwitch``), and the BN warm-up monitor watches it."""
