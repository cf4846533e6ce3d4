"""Config options from installed rescalelab plugins: a Hydra ``SearchPathPlugin``.

A plugin is a Python package that declares, in its packaging metadata, an entry point in the
group ``rescalelab.plugins``::

    [project.entry-points."rescalelab.plugins"]
    example = "rescalelab_example_plugin.conf"        # a package laid out like rescalelab/conf
    other = "some_module:CONFIG_DIR"                  # or an attribute: a path to such a folder

At start-up Hydra imports this module (it scans the ``hydra_plugins`` namespace package) and
calls :meth:`RescalelabPluginsSearchPath.manipulate_search_path`, which appends each plugin's
config folder to rescalelab's search path: its ``model/tiny_mlp.yaml`` becomes ``model=tiny_mlp``,
next to the built-in options, in any group (data, model, norm, optim, schedule, callbacks, …).
Appended means searched after rescalelab's own ``conf/``: a plugin adds options, it never
replaces a built-in one of the same name. Other Hydra apps in the environment are left alone.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENTRY_POINT_GROUP = "rescalelab.plugins"
PROVIDER_PREFIX = "rescalelab-plugin:"


def plugin_search_paths() -> list[tuple[str, str]]:
    """``[(plugin name, Hydra search path), ...]`` of every installed ``rescalelab.plugins`` entry.

    ``module.path`` gives ``pkg://module.path``; ``module:attr`` loads ``attr``, a folder path
    (or a function returning one), and gives ``file://<folder>``. A plugin that fails to load is
    skipped with a warning naming it.
    """
    found = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            if ":" in ep.value:
                target = ep.load()
                folder = Path(target() if callable(target) else target).resolve()
                if not folder.is_dir():
                    raise FileNotFoundError(f"{folder} is not a folder")
                found.append((ep.name, f"file://{folder}"))
            else:
                found.append((ep.name, f"pkg://{ep.value}"))
        except Exception as e:
            warnings.warn(f"rescalelab plugin {ep.name!r} ({ep.value}) skipped: {e}", stacklevel=2)
    return found


def is_rescalelab_search_path(search_path: ConfigSearchPath) -> bool:
    """Whether this search path is rescalelab's (its primary config folder ``rescalelab/conf``)."""
    for element in search_path.get_path():
        path = element.path.rstrip("/")
        if path == "pkg://rescalelab.conf" or path.endswith("/rescalelab/conf"):
            return True
    return False


class RescalelabPluginsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not is_rescalelab_search_path(search_path):
            return
        for name, path in plugin_search_paths():
            search_path.append(provider=f"{PROVIDER_PREFIX}{name}", path=path)
