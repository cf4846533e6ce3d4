"""Instruments: Lightning callbacks that measure training through hooks and write through the
logger; they never change training. Each ``conf/callbacks/<name>.yaml`` entry names one class
here by ``_target_``."""
