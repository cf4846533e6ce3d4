"""Config options this plugin adds, laid out like rescalelab's own ``conf/`` (one folder per group)."""
