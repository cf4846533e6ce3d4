"""Plugins: a separately installed package adds config options (YAML + classes) to rescalelab.

The example plugin (``examples/rescalelab-example-plugin``) is pip-installed into a temporary
target folder, as a user would install it (wheel, entry point metadata and all), and reached
through ``PYTHONPATH``; rescalelab itself is not touched.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.config_search_path import SearchPathQuery
from hydra.utils import instantiate

from tests.helpers import assert_ok, child_runs, cli_env, history, run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rescalelab-example-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, pip-installed (no deps) into its own folder."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src)  # build in a copy: no build/ or egg-info in the repository
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(src)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (site / "rescalelab_example_plugin" / "conf" / "model" / "tiny_mlp.yaml").exists()
    return site


def test_installed_plugin_is_found_and_adds_its_options(plugin_site, monkeypatch):
    from hydra_plugins.rescalelab_plugins.rescalelab_plugins import plugin_search_paths

    assert ("example", "pkg://rescalelab_example_plugin.conf") not in plugin_search_paths()
    monkeypatch.syspath_prepend(str(plugin_site))
    assert ("example", "pkg://rescalelab_example_plugin.conf") in plugin_search_paths()
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["model=tiny_mlp", "optim=sign_sgd", "optim.lr=0.25", "paths.root=/tmp/p",
                       "paths.output_dir=/tmp/p/out"],
        )  # fmt: skip
    assert cfg.model._target_ == "rescalelab_example_plugin.models.TinyMLP"
    assert cfg.optim._target_ == "rescalelab_example_plugin.optim.SignSGD"
    # The plugin's classes work like built-in ones: same constructor contract, same groups.
    from rescalelab.norm import BatchNorm
    from rescalelab.optim import build_optimizer, param_groups

    model = instantiate(cfg.model, input_shape=(3, 8, 8), num_classes=10, norm=BatchNorm())
    assert model(torch.zeros(4, 3, 8, 8)).shape == (4, 10)
    assert isinstance(model.net[2], torch.nn.BatchNorm1d)  # the norm plug after the hidden layer
    opt = build_optimizer(instantiate(cfg.optim), param_groups, model, None)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    opt.step()
    for p, p0 in zip(model.parameters(), before):  # signSGD: every weight moves by 0 or ±lr
        moved = (p.detach() - p0).abs()
        assert torch.all((moved < 1e-7) | ((moved - 0.25).abs() < 1e-6))
    assert math.isclose(opt.param_groups[0]["lr"], 0.25)


def test_plugin_search_path_is_only_added_to_rescalelab(plugin_site, monkeypatch):
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    from hydra_plugins.rescalelab_plugins.rescalelab_plugins import (
        RescalelabPluginsSearchPath,
    )

    monkeypatch.syspath_prepend(str(plugin_site))
    other = ConfigSearchPathImpl()
    other.append("main", "pkg://someone_else.conf")
    RescalelabPluginsSearchPath().manipulate_search_path(other)
    assert other.find_first_match(SearchPathQuery(provider="rescalelab-plugin:example")) == -1
    ours = ConfigSearchPathImpl()
    ours.append("main", "pkg://rescalelab.conf")
    RescalelabPluginsSearchPath().manipulate_search_path(ours)
    assert [e.path for e in ours.get_path()] == [
        "pkg://rescalelab.conf", "pkg://rescalelab_example_plugin.conf",
    ]  # fmt: skip


@pytest.mark.slow
def test_plugin_options_run_from_the_cli_in_a_multirun(plugin_site, root):
    env = cli_env(PYTHONPATH=str(plugin_site))
    proc = run_cli(root, "-m", "model=tiny_mlp", "optim=sign_sgd,sgd", "optim.lr=0.01", env=env)
    assert_ok(proc)
    children = {r.info.run_name: r for r in child_runs(root)}
    assert sorted(children) == ["optim=sgd #1", "optim=sign_sgd #0"]
    for run in children.values():
        assert run.info.status == "FINISHED"
        assert run.data.params["model._target_"] == "rescalelab_example_plugin.models.TinyMLP"
        assert run.data.params["model.hidden"] == "32"
        assert [v for _, v in history(root, run.info.run_id, "train/lr")] == pytest.approx(
            [0.01] * 4
        )
    sign = children["optim=sign_sgd #0"]
    assert sign.data.params["optim._target_"] == "rescalelab_example_plugin.optim.SignSGD"
    # Without the plugin on the path the option does not exist.
    missing = run_cli(root, "model=tiny_mlp")  # fails while composing, before any training
    assert missing.returncode != 0 and "tiny_mlp" in missing.stderr
