"""Where things are (``lit_cats.locations``): paths vs Hub ids, run folders, Hub failures."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lit_cats.locations import (
    experiment_dir,
    hub_errors,
    looks_like_path,
    newest_match,
    run_files,
)


def test_paths_and_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("./adapter", "/abs/adapter", "~/adapter", "logs/cats/version_0"):
        assert looks_like_path(path), path
    assert not looks_like_path("microsoft/Phi-3-mini-4k-instruct")
    Path("cat", "void").mkdir(parents=True)  # an existing folder wins over the Hub id form
    assert looks_like_path("cat/void")


def test_experiment_dir_follows_the_logger_then_the_trainer():
    logger = SimpleNamespace(save_dir="logs", name="tiny-cats")
    assert experiment_dir(SimpleNamespace(logger=logger)) == Path("logs", "tiny-cats")
    no_logger = SimpleNamespace(logger=None, default_root_dir="runs")
    assert experiment_dir(no_logger) == Path("runs")
    assert experiment_dir(None) == Path("logs")


def test_newest_match_is_the_most_recently_written(tmp_path):
    old, new = tmp_path / "version_0" / "last.ckpt", tmp_path / "version_1" / "last.ckpt"
    for i, path in enumerate((new, old)):  # version_0 written last
        path.parent.mkdir()
        path.write_text("x")
        os.utime(path, ns=(i, i))
    assert newest_match(tmp_path, "*/last.ckpt") == old
    assert newest_match(tmp_path, "*/none.ckpt") is None


def test_run_files_are_the_run_folders_own_newest_first(tmp_path):
    files = ["version_0/checkpoints/last.ckpt", "version_1/checkpoints/last.ckpt"]
    copies = ["hub-dry-run/last-checkpoint/last.ckpt", ".hub-staging/step-5/last.ckpt"]
    for i, name in enumerate(files + copies):  # the copies written last
        path = tmp_path / name
        path.parent.mkdir(parents=True)
        path.write_text("x")
        os.utime(path, ns=(i, i))
    found = run_files(tmp_path, "checkpoints/last*.ckpt")
    assert found == [tmp_path / files[1], tmp_path / files[0]]


def test_hub_failures_say_what_to_do_instead():
    advice = r"Could not load model 'cat/void'.*ConnectionError: no route.*use a local copy"
    with (
        pytest.raises(RuntimeError, match=advice),
        hub_errors("model", "cat/void", "use a local copy"),
    ):
        raise ConnectionError("no route to host")
    # A missing local file is not a Hub failure: it stays as it is.
    with pytest.raises(FileNotFoundError), hub_errors("model", "./cat", "use a local copy"):
        raise FileNotFoundError("./cat")
