"""cache.read_only(): hits as usual, a miss raises CacheMiss naming the notebook to run, nothing computed."""

import dataclasses
import threading

import pandas as pd
import pytest

from ssah_utils import cache


@dataclasses.dataclass(frozen=True)
class Cfg:
    seed: int = 0
    n: int = 4


def _compute_counter():
    calls = []

    def compute():
        calls.append(1)
        return {"table": pd.DataFrame({"x": [1, 2]}), "meta": {"k": 1}}

    return calls, compute


def test_hit_is_returned_in_read_only_mode(tmp_path):
    calls, compute = _compute_counter()
    first = cache.cached("classify_table1", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    with cache.read_only():
        again = cache.cached("classify_table1", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first["table"], again["table"])
    assert again["meta"] == {"k": 1}


@pytest.mark.parametrize("stage, notebook", [("probe", "01_probe"), ("classify_calib", "02_classify"),
                                             ("classify_scores", "02_classify"), ("freeze", "03_freeze_finetune"),
                                             ("budget_train", "04_alignment_budget"),
                                             ("budget_eval", "04_alignment_budget")])
def test_miss_raises_with_the_notebook_to_run_and_computes_nothing(tmp_path, stage, notebook):
    calls, compute = _compute_counter()
    with cache.read_only():
        with pytest.raises(cache.CacheMiss) as err:
            cache.cached(stage, Cfg(), compute, cache_dir=tmp_path, verbose=False)
    assert calls == []
    assert not any(tmp_path.rglob("*"))  # not even an empty stage folder
    msg = str(err.value)
    assert f"stage {stage!r}" in msg and f"notebooks/{notebook}.ipynb" in msg and "make reproduce" in msg
    assert err.value.stage == stage and err.value.notebook == notebook
    assert err.value.key == cache.config_key(stage, Cfg())
    assert isinstance(err.value, LookupError)


def test_unknown_stage_and_refresh_in_read_only_mode(tmp_path):
    calls, compute = _compute_counter()
    with cache.read_only():
        with pytest.raises(cache.CacheMiss, match="Run the notebook that computes it first"):
            cache.cached("mystery", Cfg(), compute, cache_dir=tmp_path, verbose=False)
        with pytest.raises(ValueError, match="read-only"):
            cache.cached("probe", Cfg(), compute, cache_dir=tmp_path, verbose=False, refresh=True)
    assert calls == []


def test_flag_is_restored_after_an_exception(tmp_path):
    calls, compute = _compute_counter()
    assert not cache.is_read_only()
    with pytest.raises(RuntimeError):
        with cache.read_only():
            assert cache.is_read_only()
            raise RuntimeError("boom")
    assert not cache.is_read_only()
    # and after a CacheMiss escaping the block: writing works again
    with pytest.raises(cache.CacheMiss):
        with cache.read_only():
            cache.cached("probe", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    cache.cached("probe", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    assert len(calls) == 1


def test_nested_blocks_restore_the_outer_state_and_hint(tmp_path):
    calls, compute = _compute_counter()
    with cache.read_only(notebook="03_freeze_finetune"):
        with cache.read_only():  # None keeps the enclosing block's hint
            with pytest.raises(cache.CacheMiss, match="notebooks/03_freeze_finetune.ipynb"):
                cache.cached("classify_calib", Cfg(), compute, cache_dir=tmp_path, verbose=False)
        with cache.read_only(notebook="04_alignment_budget"):
            with pytest.raises(cache.CacheMiss, match="notebooks/04_alignment_budget.ipynb"):
                cache.cached("classify_calib", Cfg(), compute, cache_dir=tmp_path, verbose=False)
        assert cache.is_read_only()  # the inner exits left the outer block in force
        with pytest.raises(cache.CacheMiss, match="notebooks/03_freeze_finetune.ipynb"):
            cache.cached("classify_calib", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    assert not cache.is_read_only()
    assert calls == []


def test_read_only_is_per_thread():
    seen = []
    with cache.read_only():
        t = threading.Thread(target=lambda: seen.append(cache.is_read_only()))
        t.start()
        t.join()
    assert seen == [False]
