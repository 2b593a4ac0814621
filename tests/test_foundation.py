"""Config, presets, environment report, cache, figure saving and the data root."""

import dataclasses
import hashlib
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from ssah_utils import cache, config, datasets, plots


@dataclasses.dataclass(frozen=True)
class Cfg:
    seed: int = 0
    n: int = 4
    names: tuple = ("a", "b")


# ---------------------------------------------------------------- presets and seeding

def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        config.get_preset("llama-99b")
    for name in config.PRESETS:
        assert name in str(err.value)


def test_custom_model_overrides_preset():
    p = config.get_preset("organism", model="org/some-chat-model")
    assert p.aligned == "org/some-chat-model" and not p.is_organism
    assert p.harmful_test == "advbench"


def test_seed_everything_is_reproducible():
    config.seed_everything(3)
    a = torch.randn(5)
    config.seed_everything(3)
    assert torch.equal(a, torch.randn(5))
    with pytest.raises(ValueError):
        config.seed_everything(-1)


def test_env_report_has_versions_device_and_commit():
    rep = config.env_report()
    for key in ("python", "torch", "transformers", "device", "git_commit", "papermill"):
        assert key in rep and rep[key]
    assert rep["torch"].startswith("2.13.0")
    assert rep["device"].startswith(("cpu", "cuda"))


# ---------------------------------------------------------------- cache

def test_cache_hits_only_on_identical_config(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"table": pd.DataFrame({"x": [1, 2]}), "t": torch.arange(3.0), "meta": {"k": 1}, "obj": {1, 2}}

    r1 = cache.cached("stage", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    r2 = cache.cached("stage", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(r1["table"], r2["table"])
    torch.testing.assert_close(r2["t"], torch.arange(3.0))
    assert r2["meta"] == {"k": 1} and r2["obj"] == {1, 2}
    cache.cached("stage", Cfg(seed=1), compute, cache_dir=tmp_path, verbose=False)
    cache.cached("stage", Cfg(), compute, model_revision="other", cache_dir=tmp_path, verbose=False)
    cache.cached("other_stage", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    assert len(calls) == 4
    entry = cache.cache_path("stage", Cfg(), cache_dir=tmp_path)
    assert json.loads((entry / "config.json").read_text()) == {"seed": 0, "n": 4, "names": ["a", "b"]}


def test_cache_write_is_atomic_on_interruption(tmp_path, monkeypatch):
    write = cache._write_part

    def interrupted(folder, stage, name, value):
        if name == "b":
            raise KeyboardInterrupt("interrupted while writing")
        return write(folder, stage, name, value)

    monkeypatch.setattr(cache, "_write_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.cached("s", Cfg(), lambda: {"a": pd.DataFrame({"x": [1]}), "b": 2}, cache_dir=tmp_path, verbose=False)
    monkeypatch.setattr(cache, "_write_part", write)
    assert cache.load_cached("s", Cfg(), cache_dir=tmp_path) is None
    assert list((tmp_path / "s").iterdir()) == []  # no half-written entry or temp folder left
    out = cache.cached("s", Cfg(), lambda: {"a": 1}, cache_dir=tmp_path, verbose=False)
    assert out == {"a": 1} and cache.load_cached("s", Cfg(), cache_dir=tmp_path) == {"a": 1}


def test_cache_entry_without_manifest_is_a_miss(tmp_path):
    entry = cache.cache_path("s", Cfg(), cache_dir=tmp_path)
    entry.mkdir(parents=True)
    (entry / "a.json").write_text("1")  # a folder merely existing is not a hit
    assert cache.load_cached("s", Cfg(), cache_dir=tmp_path) is None


def test_cache_rejects_bad_configs_and_results(tmp_path):
    with pytest.raises(TypeError):
        cache.config_key("s", {"not": "a dataclass"})

    @dataclasses.dataclass(frozen=True)
    class Bad:
        x: object = dataclasses.field(default_factory=object)

    with pytest.raises(TypeError, match="plain values"):
        cache.config_key("s", Bad())
    with pytest.raises(TypeError, match="must return a dict"):
        cache.cached("s", Cfg(), lambda: [1, 2], cache_dir=tmp_path, verbose=False)


def test_config_key_is_stable_and_order_free():
    assert cache.config_key("s", Cfg()) == cache.config_key("s", Cfg())
    assert cache.config_key("s", Cfg()) != cache.config_key("s", Cfg(names=("b", "a")))


# ---------------------------------------------------------------- figures and tables

def test_save_figure_is_byte_stable(tmp_path):
    plots.set_style()

    def draw():
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1, 0, 2])
        return fig

    digests = []
    for i in range(2):
        fig = draw()
        paths = plots.save_figure(fig, "fig_test", outdir=tmp_path / str(i))
        plt.close(fig)
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert digests[0] == digests[1]
    with pytest.raises(ValueError):
        plots.save_figure(draw(), "Bad Name", outdir=tmp_path)


def test_save_table_writes_csv_and_tex(tmp_path):
    df = pd.DataFrame({"asr": [0.1, 0.66]}, index=["none", "ESU"])
    csv, tex = plots.save_table(df, "table1_test", outdir=tmp_path)
    assert pd.read_csv(csv, index_col=0)["asr"].tolist() == [0.1, 0.66]
    assert "\\begin{tabular}" in tex.read_text()
    plain = pd.DataFrame({"label": ["ESU", "RU"], "pct": [1.3, 14.9]})
    csv, _ = plots.save_table(plain, "table1_plain", outdir=tmp_path)
    assert csv.read_text().splitlines()[0] == "label,pct"  # no anonymous 0..n-1 index column


# ---------------------------------------------------------------- data root

def test_data_root_resolution_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    for root in (explicit, env):
        (root / "gsm8k").mkdir(parents=True)
        (root / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": root.name, "answer": "#### 1"}) + "\n")
    monkeypatch.setenv(datasets.ENV_VAR, str(env))
    monkeypatch.setattr(datasets, "verify_file", lambda ds, path: path)  # made-up files: the SHA pin is tested in test_reliability
    assert datasets.dataset_path("gsm8k", data_root=explicit, download=False) == explicit / "gsm8k/test.jsonl"
    assert datasets.dataset_path("gsm8k", download=False) == env / "gsm8k/test.jsonl"
    assert datasets.load_real("gsm8k", download=False)["question"].tolist() == ["env"]
    monkeypatch.delenv(datasets.ENV_VAR)
    monkeypatch.setattr(datasets, "EXTERNAL_DIR", explicit)
    assert datasets.data_root() == explicit
    assert datasets.dataset_path("gsm8k", download=False) == explicit / "gsm8k/test.jsonl"


def test_missing_dataset_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(datasets, "EXTERNAL_DIR", tmp_path / "external")
    monkeypatch.setenv("SSAH_OFFLINE", "1")
    with pytest.raises(datasets.DatasetUnavailableError) as err:
        datasets.dataset_path("advbench")
    msg = str(err.value)
    assert "downloads are off" in msg and datasets.ENV_VAR in msg
    assert "llm-attacks" in msg and "advbench/harmful_behaviors.csv" in msg
    with pytest.raises(KeyError, match="known"):
        datasets.dataset_path("advbench-typo")
    with pytest.raises(NotADirectoryError):
        datasets.data_root(tmp_path / "nope")


def test_bad_set_arguments():
    with pytest.raises(KeyError, match="unknown prompt set"):
        datasets.load_set("no_such_set")
    with pytest.raises(ValueError, match="take"):
        datasets.load_set("advbench", take="last")


def test_real_datasets_match_manifest_hashes(shared_data):
    for ds in datasets.REAL_DATASETS.values():
        path = datasets.dataset_path(ds.name, download=False)
        if ds.sha256_prefix:
            assert datasets.sha256_prefix(path) == ds.sha256_prefix, ds.name


def test_real_prompt_sets_load_as_records(shared_data):
    adv = datasets.load_set("advbench", n=100, take="first")
    assert len(adv) == 100 and adv[0]["prompt"].startswith("Write a script that can exploit")
    assert set(datasets.RECORD_FIELDS) <= set(adv[0])
    pairs = datasets.load_set("refusal_pairs", n=128, seed=0)
    assert len(pairs) == 128 and all("[INST]" not in r["prompt"] for r in pairs)
    assert datasets.load_set("refusal_pairs", n=128, seed=0) == pairs
    alpaca = datasets.load_set("alpaca")
    assert 4900 < len(alpaca) < 5000  # refusing rows are filtered out
    assert {r["kind"] for r in datasets.load_set("xstest_safe")} == {"borderline"}


# ---------------------------------------------------------------- the paper's numbers

def test_reported_numbers_cite_their_source():
    from ssah_utils import paper

    df = paper.reported()
    assert df["source"].str.match(r"^(Table|Fig) \d").all()
    t1 = paper.reported("table1")
    esu = t1[(t1.model == "Llama-2-7B-chat") & (t1.setting.str.startswith("remove ESU")) & (t1.metric == "avg_asr")]
    assert esu["value"].tolist() == [66.0]
    with pytest.raises(KeyError, match="known experiments"):
        paper.reported("table9")


def test_sets_revision_follows_world_file_content(tmp_path, monkeypatch):
    """Cache keys of every stage use it: a regenerated world set must change it, a real set's name must count."""
    from ssah_utils import config, datasets

    monkeypatch.setattr(config, "WORLD_DIR", tmp_path)
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    r1 = datasets.sets_revision(["a", None, ""])
    assert r1 == datasets.sets_revision(["a"])  # empty names are skipped
    (tmp_path / "a.jsonl").write_text('{"prompt": "y"}\n')
    assert datasets.sets_revision(["a"]) != r1
    assert datasets.sets_revision(["advbench"]) != datasets.sets_revision(["xstest_safe"])
