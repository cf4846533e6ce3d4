"""data=imagenet_subset on a tiny ImageFolder tree of real JPEGs: subsets, cache, raw folder, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rescalelab.data import ImageNetSubset
from rescalelab.data.imagenet import decode_image, default_resize, keep_count, select_subset
from rescalelab.data.imagenet.prepare import main
from rescalelab.errors import ConfigError
from tests.fixtures_data import truncate_file, wnid, write_garbage, write_imagefolder
from tests.helpers import all_runs, assert_ok, cli_env, run_cli

REPO = Path(__file__).resolve().parents[1]
COUNTS = [6, 8, 10, 13]  # train images per class: the classes differ on purpose


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_imagefolder(root, num_classes=4, train_counts=COUNTS, val_count=3)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _dm(root: Path, **kw) -> ImageNetSubset:
    args = {"num_classes": None, "fraction": 0.5, "image_size": 24, "batch_size": 4,
            "num_workers": 0, "progress": False, **kw}  # fmt: skip
    return ImageNetSubset(root=str(root), **args)


# -- subset selection ---------------------------------------------------------------------------
def test_keep_count_rounds_half_up_and_keeps_at_least_one():
    assert [keep_count(0.5, n) for n in (0, 1, 2, 3, 5, 13)] == [0, 1, 1, 2, 3, 7]
    assert keep_count(0.1, 1300) == 130 and keep_count(0.1, 732) == 73
    assert keep_count(1.0, 7) == 7 and keep_count(0.01, 7) == 1


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_subset_is_stratified_deterministic_and_seeded(folder, fraction):
    kw = {"classes": None, "num_classes": None, "fraction": fraction, "val_fraction": 2 / 3}
    a = select_subset(folder, seed=0, **kw)
    assert a == select_subset(folder, seed=0, **kw)
    assert a.classes == [wnid(c) for c in range(4)]
    for label, n in enumerate(COUNTS):
        files = [p for p, y in a.train if y == label]
        assert len(files) == keep_count(fraction, n)  # every class keeps its fraction
        assert all(p.startswith(f"train/{wnid(label)}/") for p in files)
        assert len([p for p, y in a.val if y == label]) == 2
    other = select_subset(folder, seed=1, **kw)
    assert [len(other.train)] == [len(a.train)]
    if fraction < 1:
        assert other.train != a.train and other.digest() != a.digest()
    else:
        assert other.train == a.train  # everything is kept whatever the seed


def test_num_classes_draws_classes_from_the_seed(folder):
    kw = {"classes": None, "num_classes": 2, "fraction": 1.0, "val_fraction": 1.0}
    picks = {tuple(select_subset(folder, seed=s, **kw).classes) for s in range(8)}
    assert all(len(p) == 2 and list(p) == sorted(p) for p in picks)
    assert len(picks) > 1  # different seeds choose different classes
    assert select_subset(folder, seed=3, **kw) == select_subset(folder, seed=3, **kw)
    # the images kept of a class do not depend on which other classes were chosen
    full = select_subset(folder, seed=3, **{**kw, "num_classes": None, "fraction": 0.5})
    two = select_subset(folder, seed=3, **{**kw, "fraction": 0.5})
    full_files = {p for p, _ in full.train}
    assert {p for p, _ in two.train} <= full_files


def test_explicit_class_list_sets_the_labels(folder):
    s = select_subset(
        folder, classes=[wnid(3), wnid(1)], num_classes=None, fraction=1.0, val_fraction=1.0,
        seed=0,
    )  # fmt: skip
    assert s.classes == [wnid(1), wnid(3)]
    assert {y for _, y in s.train} == {0, 1} and len(s.train) == COUNTS[1] + COUNTS[3]


# -- decoding and the cache ---------------------------------------------------------------------
def test_decode_image_resizes_the_shorter_side_and_centre_crops(folder):
    path = folder / "train" / wnid(0) / f"{wnid(0)}_0.JPEG"
    x = decode_image(path, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.uint8
    with Image.open(path) as im:
        w, h = im.size
        rgb = im.convert("RGB")
    s = 32 / min(w, h)
    nw, nh = max(32, round(w * s)), max(32, round(h * s))
    ref = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - 32) // 2, (nh - 32) // 2
    ref = np.asarray(ref.crop((left, top, left + 32, top + 32))).transpose(2, 0, 1)
    assert np.abs(x.astype(int) - ref.astype(int)).mean() < 1.0  # same geometry (JPEG draft aside)
    grey = [p for p in (folder / "train").rglob("*.JPEG") if Image.open(p).mode == "L"]
    assert grey, "the fixture has greyscale JPEGs"
    g = decode_image(grey[0], 16)
    assert g.shape == (3, 16, 16) and (g[0] == g[1]).all() and (g[1] == g[2]).all()


def test_cache_round_trip_gives_the_pixels_of_direct_decoding(folder, tmp_path):
    dm = _dm(folder, cache=str(tmp_path / "cache"), num_workers=2)
    counts = dm.prepare_cache()
    subset = dm.select()
    assert counts == {"decoded": len(subset.train) + len(subset.val), "reused": 0, "skipped": 0}
    dm.setup("fit")
    S = default_resize(24)
    assert dm.resize_size == S == 27
    for split in ("train", "val"):
        items = getattr(subset, split)
        direct = np.stack([decode_image(folder / p, S) for p, _ in items])
        assert np.array_equal(dm.tensors[f"x_{split}"].numpy(), direct)
        assert dm.tensors[f"y_{split}"].tolist() == [y for _, y in items]
    lines = (tmp_path / "cache" / "files.tsv").read_text().splitlines()
    assert lines[0] == "split\tlabel\tpath" and lines[1:] == subset.lines()
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["subset_hash"] == subset.digest() and manifest["complete"] is True
    assert dm.describe() == {
        "num_classes": 4, "resize_size": 27, "source": "cache", "subset_hash": subset.digest(),
        "num_train": len(subset.train), "num_val": len(subset.val), "num_skipped": 0,
    }  # fmt: skip
    assert dm.artifacts == {"subset_files.tsv": tmp_path / "cache" / "files.tsv"}
    # the raw-folder pipeline serves the very same pixels
    raw = _dm(folder)
    raw.setup("fit")
    assert raw.describe()["subset_hash"] == subset.digest()
    xb, yb = next(iter(raw.val_dataloader()))
    assert xb.dtype == torch.uint8 and torch.equal(xb, dm.tensors["x_val"][: len(xb)])
    assert raw.artifacts["subset_files.tsv"].read_text().splitlines()[1:] == subset.lines()


def test_interrupted_build_resumes_where_it_stopped(folder, tmp_path):
    cache = tmp_path / "cache"
    dm = _dm(folder, cache=str(cache))
    dm.prepare_cache()
    complete = np.fromfile(cache / "train_x.u8", dtype=np.uint8).copy()
    # the state an interrupt leaves: some rows not yet written, manifest not complete
    n = len(dm.select().train)
    done = np.memmap(cache / "train_done.u8", np.uint8, "r+", shape=(n,))
    done[3:9] = 0
    done.flush()
    x = np.memmap(cache / "train_x.u8", np.uint8, "r+", shape=(n, 3, 27, 27))
    x[3:9] = 0
    x.flush()
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ConfigError, match="is incomplete .* rerun rescalelab-prepare-imagenet"):
        _dm(folder, cache=str(cache)).setup("fit")
    counts = _dm(folder, cache=str(cache)).prepare_cache()
    total = n + len(dm.select().val)
    assert counts["decoded"] == 6 and counts["reused"] == total - 6
    assert np.array_equal(np.fromfile(cache / "train_x.u8", dtype=np.uint8), complete)
    assert _dm(folder, cache=str(cache)).prepare_cache()["decoded"] == 0  # complete: no work


def test_cache_built_for_another_subset_is_refused(folder, tmp_path):
    cache = tmp_path / "cache"
    _dm(folder, cache=str(cache)).prepare_cache()
    with pytest.raises(ConfigError, match=r"holds a different subset: built with fraction=0.5 "):
        _dm(folder, cache=str(cache), fraction=1.0).prepare_cache()
    with pytest.raises(ConfigError, match=r"holds a different subset: built with store_size=27"):
        _dm(folder, cache=str(cache), image_size=32).setup("fit")
    with pytest.raises(ConfigError, match="holds a different subset: built with seed=0"):
        _dm(folder, cache=str(cache), seed=1).setup("fit")
    # same request, but the folder's files changed since the build
    changed = _copy(folder, tmp_path / "changed")
    (changed / "train" / wnid(0) / f"{wnid(0)}_0.JPEG").rename(
        changed / "train" / wnid(0) / "renamed.JPEG"
    )
    with pytest.raises(ConfigError, match="the folder now gives .*: its files changed"):
        _dm(changed, cache=str(cache)).setup("fit")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="non-empty folder without a manifest.json"):
        _dm(folder, cache=str(tmp_path / "junk")).prepare_cache()


def test_missing_cache_says_how_to_build_it(folder, tmp_path):
    with pytest.raises(ConfigError) as e:
        _dm(folder, cache=str(tmp_path / "nocache")).setup("fit")
    assert "does not exist yet: build it first with `rescalelab-prepare-imagenet" in str(e.value)
    assert f"data.root={folder} data.cache={tmp_path / 'nocache'} data.fraction=0.5" in str(e.value)


def test_a_failing_chunk_result_cancels_the_chunks_not_yet_started():
    """An error recorded for one chunk (a corrupt image, Ctrl-C) stops the work: the chunks not
    yet started are cancelled rather than all decoded before the error is raised."""
    import threading

    from rescalelab.data.imagenet.pool import run_chunks

    ran: list[int] = []
    gate = threading.Event()

    def work(chunk: list[int]) -> int:
        ran.append(chunk[0])
        if chunk[0] > 0:  # the first chunk completes; the one running after it waits
            assert gate.wait(timeout=60)
        return chunk[0]

    def fail(result: int, chunk: list[int]) -> None:
        gate.set()
        raise ValueError(f"bad image in chunk {result}")

    chunks = [[k, k] for k in range(50)]
    with pytest.raises(ValueError, match="bad image in chunk 0"):
        run_chunks(work, chunks, fail, workers=1, description="x", progress=False)
    assert ran[0] == 0 and len(ran) <= 2  # at most the chunk already running finished


def test_cross_key_checks_stay_with_the_data(folder):
    with pytest.raises(ConfigError, match="data.resize_size=20 is invalid: expected null or an "
                       "integer >= data.image_size=24"):  # fmt: skip
        _dm(folder, resize_size=20)
    with pytest.raises(ConfigError, match="data.batch_size=64 is invalid: expected <= the 19 "):
        _dm(folder, batch_size=64).setup()  # 19 training images: 3 + 4 + 5 + 7


# -- errors -------------------------------------------------------------------------------------
def test_missing_or_incomplete_folder_names_the_layout(folder, tmp_path):
    layout = re.escape("train/<wnid>/*.JPEG and")
    with pytest.raises(ConfigError, match=f"does not exist: expected .*{layout}"):
        _dm(tmp_path / "absent").setup()
    only_train = tmp_path / "only_train"
    shutil.copytree(folder / "train", only_train / "train")
    with pytest.raises(ConfigError, match=f"lacks val/: expected .*{layout}"):
        _dm(only_train).setup()
    no_class = _copy(folder, tmp_path / "no_class")
    shutil.rmtree(no_class / "val" / wnid(2))
    with pytest.raises(ConfigError, match=f"is incomplete: val/{wnid(2)}/ is missing"):
        _dm(no_class).setup()
    empty = _copy(folder, tmp_path / "empty")
    for p in (empty / "train" / wnid(1)).iterdir():
        p.unlink()
    with pytest.raises(ConfigError, match=f"is incomplete: train/{wnid(1)}/ has no image file"):
        _dm(empty).setup()
    with pytest.raises(ConfigError, match="data.num_classes=7 is invalid: .* has only 4 classes"):
        _dm(folder, num_classes=7).setup()
    with pytest.raises(ConfigError, match="data.classes is invalid: n99 not found"):
        _dm(folder, classes=["n99", wnid(0)]).setup()


def test_unreadable_image_fails_with_its_name_or_is_skipped_and_counted(folder, tmp_path):
    root = _copy(folder, tmp_path / "bad")
    bad = root / "train" / wnid(0) / f"{wnid(0)}_1.JPEG"
    write_garbage(bad)
    full = {"fraction": 1.0}
    with pytest.raises(ConfigError) as e:
        _dm(root, **full).setup()
    assert f"cannot read image {bad} (UnidentifiedImageError" in str(e.value)
    assert "data.skip_corrupt=true" in str(e.value)
    dm = _dm(root, skip_corrupt=True, **full)
    dm.setup()
    rel = f"train/{wnid(0)}/{wnid(0)}_1.JPEG"
    assert dm.describe()["num_skipped"] == 1 and dm.describe()["num_train"] == sum(COUNTS) - 1
    assert rel not in {p for p, _ in dm.subset.train}
    skipped = dm.artifacts["subset_skipped.tsv"].read_text().splitlines()
    assert skipped[1].startswith(f"train\t{rel}\tUnidentifiedImageError")


def test_truncated_jpeg_is_found_by_decoding(folder, tmp_path):
    root = _copy(folder, tmp_path / "trunc")
    bad = root / "val" / wnid(3) / f"{wnid(3)}_2.JPEG"
    truncate_file(bad, 0.6)
    _dm(root, check="header").setup()  # the header alone looks fine ...
    with pytest.raises(ConfigError, match=f"cannot read image {bad} .*truncated"):
        _dm(root).setup()  # ... decoding finds it (data.check=decode, the default)
    # the cache builder decodes everything: it names the file, or skips it and records it
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=f"cannot decode image {bad} .*truncated"):
        _dm(root, cache=str(cache)).prepare_cache()
    counts = _dm(root, cache=str(cache), skip_corrupt=True).prepare_cache()
    assert counts["skipped"] == 1
    dm = _dm(root, cache=str(cache))
    dm.setup("fit")
    assert dm.describe()["num_skipped"] == 1
    assert len(dm.tensors["x_val"]) == len(dm.select().val) - 1 == 11
    assert dm.tensors["y_val"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]


# -- end to end ---------------------------------------------------------------------------------
CLI = ["data=imagenet_subset", "data.num_classes=null", "data.fraction=0.5",
       "data.image_size=32", "data.batch_size=8", "data.progress=false", "model=alexnet",
       "model.pool_size=1",
       "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "callbacks=none",
       "+trainer.enable_checkpointing=false",
       "trainer.enable_progress_bar=false"]  # fmt: skip


def _prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_imagenet_subset.py"), *args],
        capture_output=True, text=True, env=cli_env(), cwd=cwd, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_prepares_a_cache_then_trains_alexnet_on_it_and_on_the_raw_folder(folder, root):
    cache = root / "cache"
    data = [f"data.root={folder}", f"data.cache={cache}", "data.num_classes=null",
            "data.fraction=0.5", "data.image_size=32", "data.num_workers=2"]  # fmt: skip
    prep = _prepare(*data, cwd=root)
    assert prep.returncode == 0, prep.stderr[-3000:]
    # 4 classes: 3 + 4 + 5 + 7 train images (half of 6, 8, 10, 13) and 3 + 3 + 3 + 3 val
    assert "19 train + 12 val images of 4 classes at 37px" in prep.stdout
    assert "31 decoded now, 0 reused, 0 skipped" in prep.stdout

    assert_ok(run_cli(root, *CLI, f"data.root={folder}", f"data.cache={cache}", tiny=False))
    assert_ok(run_cli(root, *CLI, f"data.root={folder}", "data.num_workers=1", tiny=False))
    runs = sorted(all_runs(root), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    cached, raw = (r.data.params for r in runs)
    assert cached["data.source"] == "cache" and raw["data.source"] == "folder"
    assert cached["data.subset_hash"] == raw["data.subset_hash"]
    for p in (cached, raw):
        assert p["model._target_"] == "rescalelab.models.AlexNet"
        assert (p["data.num_train"], p["data.num_val"], p["data.num_classes"]) == ("19", "12", "4")
    for r in runs:  # 19 // 8 = 2 steps per epoch, 2 epochs
        assert r.data.metrics["train/loss"] > 0 and "val/acc" in r.data.metrics
    # The exact file list of the subset is an artifact of each run.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for r in runs:
        local = client.download_artifacts(r.info.run_id, "data/subset_files.tsv", str(root))
        assert len(Path(local).read_text().strip().splitlines()) >= 31


def test_prepare_command_reports_reuse_and_refuses_another_subset(folder, tmp_path, capsys):
    data = [f"data.root={folder}", f"data.cache={tmp_path / 'c'}", "data.num_classes=2",
            "data.image_size=16", "data.num_workers=0", "data.progress=false", "seed=5"]  # fmt: skip
    assert main(data) == 0
    first = capsys.readouterr().out
    assert main(data) == 0
    again = capsys.readouterr().out
    n = int(first.split(" decoded now")[0].split("(")[-1])
    assert n > 0 and f"0 decoded now, {n} reused" in again
    assert first.split("subset ")[1][:16] == again.split("subset ")[1][:16]
    assert main([*data[:-1], "seed=6"]) == 2
    err = capsys.readouterr().err
    assert "error: data.cache=" in err and "holds a different subset" in err
    assert main(["data.fraction=2"]) == 2
    assert "data.fraction=2 is invalid: expected a fraction in (0, 1]" in capsys.readouterr().err


def test_cli_corrupt_image_fails_before_any_run(folder, root, tmp_path):
    bad_root = _copy(folder, tmp_path / "bad")
    bad = bad_root / "train" / wnid(2) / f"{wnid(2)}_0.JPEG"
    write_garbage(bad)
    proc = run_cli(root, *CLI, f"data.root={bad_root}", "data.fraction=1.0", tiny=False)
    assert proc.returncode == 2
    assert f"error: data.root: cannot read image {bad}" in proc.stderr
    assert "Traceback" not in proc.stderr and all_runs(root) == []
