"""Kept splits (`stages.core.data.memo`): what is read back is what sklearn computes, and a process
that reads it back never imports sklearn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exitflow.stages.core.data import memo
from exitflow.stages.core.data.memo import CACHE_DIR_ENV, memoized
from exitflow.stages.core.data.split import sklearn_split, stratified_split, stratified_subset

ROOT = Path(__file__).resolve().parents[1]

# A fresh process loads digits' splits and says what it got and whether sklearn was imported.
LOAD = """
import json, sys
from exitflow.stages.core.data import DataSpec, load_splits
s = load_splits(DataSpec(name="digits", train_subset=300), seed=4)
print(json.dumps({"sklearn": "sklearn" in sys.modules, "val": s.val.labels.tolist(), "test": s.test.labels.tolist(),
                  "train0": s.train.images[0].flatten().tolist()}))
"""


def _load_in_fresh_process(cache: Path | str) -> dict:
    env = {**os.environ, CACHE_DIR_ENV: str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_second_process_reads_the_splits_back_without_sklearn(tmp_path: Path) -> None:
    first, second = _load_in_fresh_process(tmp_path), _load_in_fresh_process(tmp_path)
    assert first["sklearn"] and not second["sklearn"]
    assert second == {**first, "sklearn": False}
    assert {p.name.split("-")[0] for p in (tmp_path / "arrays").iterdir()} == {"digits", "split"}
    off = _load_in_fresh_process("off")  # keeping off: computed every time, the same splits
    assert off["sklearn"] and off == first


def test_kept_splits_are_sklearns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.model_selection import train_test_split

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    labels = np.random.default_rng(0).integers(0, 5, 200)
    for _ in range(2):  # computed, then read back
        train, val = stratified_split(labels, 0.25, seed=7)
        a, b = train_test_split(np.arange(200), test_size=50, stratify=labels, random_state=7, shuffle=True)
        assert np.array_equal(train, np.sort(a)) and np.array_equal(val, np.sort(b))
        keep, _ = train_test_split(np.arange(200), train_size=60, stratify=labels, random_state=7, shuffle=True)
        assert np.array_equal(stratified_subset(labels, 60, seed=7), np.sort(keep))
    assert len(list((tmp_path / "arrays").iterdir())) == 2


def test_every_input_is_in_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    labels = np.repeat(np.arange(4), 25)
    base = sklearn_split(labels, 0, test_size=20)
    for other in (sklearn_split(labels, 1, test_size=20), sklearn_split(labels, 0, test_size=24),
                  sklearn_split(np.roll(labels, 1), 0, test_size=20)):
        assert not all(np.array_equal(x, y) for x, y in zip(base, other))
    assert len(list((tmp_path / "arrays").iterdir())) == 4
    # The same values in another dtype or shape are another input.
    assert memo.memo_key([labels]) != memo.memo_key([labels.astype(np.int32)]) != memo.memo_key([labels.reshape(4, 25)])
    before = memo.memo_key([labels])
    monkeypatch.setattr(memo, "MEMO_VERSION", memo.MEMO_VERSION + 1)  # a memoized computation changed
    assert memo.memo_key([labels]) != before


def test_a_torn_file_is_computed_again_and_an_unwritable_folder_costs_only_the_saving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    calls: list[int] = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"a": np.arange(5)}

    assert np.array_equal(memoized("t", (1,), compute)["a"], np.arange(5))
    [kept] = (tmp_path / "arrays").iterdir()
    kept.write_bytes(kept.read_bytes()[:40])  # a torn write (another filesystem, a full disk)
    assert np.array_equal(memoized("t", (1,), compute)["a"], np.arange(5)) and len(calls) == 2
    assert np.array_equal(memoized("t", (1,), compute)["a"], np.arange(5)) and len(calls) == 2  # whole again
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocked))  # its arrays folder cannot be made
    assert np.array_equal(memoized("t", (1,), compute)["a"], np.arange(5)) and len(calls) == 3
    assert not [p for p in tmp_path.rglob(".t-*")]  # no temporary file left behind


def test_the_default_folder_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert memo.cache_dir() == tmp_path / "exitflow" / "arrays"
    monkeypatch.setenv(CACHE_DIR_ENV, "OFF")
    assert memo.cache_dir() is None


def test_sklearn_version_is_read_without_importing_it() -> None:
    code = "import sys; from stages.core.data.memo import sklearn_version as v; print(v(), 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    from importlib import metadata

    assert out == [metadata.version("scikit-learn"), "False"]
