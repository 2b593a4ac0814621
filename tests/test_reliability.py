"""Bad inputs and faults (issue 14), table-driven: each gives the expected error type and message, is
refused before anything is computed, cached or written, and no committed file changes.

Each row was run against the code before issue 14 (the `main` branch) and fails there; see the report
of the `rel` branch for how that was checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from ssah_utils import cache, config, datasets
from ssah_utils import stage_budget as sb
from ssah_utils import stage_classify as sc
from ssah_utils import stage_figures as sfig
from ssah_utils import stage_freeze as sf
from ssah_utils import stage_probe as sp

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ("figures", "tables", "notebooks", "data/organism", "data/world", "data/paper")


def _committed_digest() -> dict[str, str]:
    out = {}
    for top in COMMITTED:
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and "cache" not in p.parts:
                out[str(p.relative_to(ROOT))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def no_committed_file_changes():
    """Every test of this file leaves every committed output and data file byte for byte as it was."""
    before = _committed_digest()
    yield
    after = _committed_digest()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"committed files changed: {changed[:20]}"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache and output root; model loading fails loudly, so 'refused early' is proven."""
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("SSAH_OUTPUT_DIR", raising=False)
    yield tmp_path
    if hasattr(config, "activate_run"):
        config.activate_run()  # back to the default run


def _no_load(*a, **k):
    raise AssertionError("a model was loaded: the bad input was not refused early")


# --------------------------------------------------------------------------------------------------
# 1. Parameters refused when the config is built, before any model is loaded
# --------------------------------------------------------------------------------------------------

BAD_PARAMS = [
    # (id, builder, kwargs, error type, message regex)
    ("h1 above 1", sc.make_config, dict(h1=1.5), ValueError, r"h1 must be a number in \(0, 1\), got 1.5"),
    ("h0 zero", sc.make_config, dict(h0=0.0), ValueError, r"h0 must be a number in \(0, 1\)"),
    ("h2 negative", sc.make_config, dict(h2=-0.1), ValueError, r"h2 must be a number in \(0, 1\)"),
    ("h1 as text", sc.make_config, dict(h1="0.01"), TypeError, r"h1 must be a number, got '0.01'"),
    ("n_calib beyond the pool", sc.make_config, dict(n_calib=100000), ValueError,
     r"n_calib=100000 but the safety calibration pool \(calib_safety\) has only 135"),
    ("n_calib = the whole pool, 3 draws", sc.make_config, dict(n_calib=135), ValueError,
     r"all 3 calibration draws would be identical"),
    ("n_calib zero", sc.make_config, dict(n_calib=0), ValueError, r"n_calib must be >= 1"),
    ("n_calib float", sc.make_config, dict(n_calib=12.5), TypeError, r"n_calib must be an integer"),
    ("no random seed", sc.make_config, dict(n_random_seeds=0), ValueError, r"n_random_seeds .*at least one.* >= 1"),
    ("no calibration seed", sc.make_config, dict(n_calib_seeds=0), ValueError, r"n_calib_seeds must be >= 1"),
    ("unknown scorer", sc.make_config, dict(scorer="magic"), ValueError, r"scorer must be one of"),
    ("unknown threshold rule", sc.make_config, dict(threshold_rule="ceil"), ValueError, r"threshold_rule must be one of"),
    ("dose fraction 1.5", sc.make_config, dict(dose_fractions=(0.1, 1.5)), ValueError, r"dose_fractions must be"),
    ("n_eval zero", sc.make_config, dict(n_eval=0), ValueError, r"n_eval must be >= 1"),
    ("seed negative", sc.make_config, dict(seed=-1), ValueError, r"seed must be a non-negative int"),
    ("seed as text", sc.make_config, dict(seed="one"), ValueError, r"seed must be a non-negative int"),
    ("crafted model", sc.make_config, dict(model="x'); import os; os.system('true'); ('"), ValueError,
     r"neither a Hugging Face id"),
    ("04 epochs count", sb.make_config, dict(epochs="1,1,1"), ValueError, r"3 values but there are 2 SFT stage"),
    ("04 epochs text", sb.make_config, dict(epochs="one,two"), ValueError, r"epochs must be a number or comma-separated"),
    ("04 epochs negative", sb.make_config, dict(epochs=-1), ValueError, r"every epochs value must be a positive"),
    ("04 epochs bool", sb.make_config, dict(epochs=True), TypeError, r"epochs must be a number"),
    ("04 no seed", sb.make_config, dict(n_seeds=0), ValueError, r"n_seeds .*>= 1"),
    ("04 ru_frac 1.5", sb.make_config, dict(ru_frac=1.5), ValueError, r"ru_frac must be a share of parameters in \(0, 1\)"),
    ("04 n_calib beyond the pool", sb.make_config, dict(n_calib=100000), ValueError, r"n_calib=100000 but the safety"),
    ("04 batch zero", sb.make_config, dict(batch_size=0), ValueError, r"batch_size must be >= 1"),
    ("04 unknown condition", sb.make_config, dict(conditions="full,everything"), ValueError, r"subset of"),
    ("04 lr scale zero", sb.make_config, dict(lr_scale_masked=0.0), ValueError, r"lr_scale_masked must be"),
    ("03 epochs of 04's format", sf.make_config, dict(epochs="1,1"), ValueError,
     r"03_freeze_finetune fine-tunes in one stage: epochs has 2 values"),
    ("03 epochs negative", sf.make_config, dict(epochs=-0.5), ValueError, r"every epochs value must be a positive"),
    ("03 lr negative", sf.make_config, dict(lr=-1e-4), ValueError, r"lr must be a number in \(0, inf\)"),
    ("03 no seed", sf.make_config, dict(n_seeds=0), ValueError, r"n_seeds .*>= 1"),
    ("03 top_cu_frac 2", sf.make_config, dict(top_cu_frac=2.0), ValueError, r"top_cu_frac must be a number in \[0, 1\]"),
    ("03 n_eval zero", sf.make_config, dict(n_eval=0), ValueError, r"n_eval must be >= 1"),
    ("03 fit_ratio 1", sf.make_config, dict(fit_ratio=1.0), ValueError, r"fit_ratio .* must be a number in \[0, 1\)"),
    ("03 relabel text", sf.make_config, dict(relabel="yes"), TypeError, r"relabel must be True or False"),
    ("01 test_frac 1.5", sp.make_config, dict(test_frac=1.5), ValueError, r"test_frac must be a number in \(0, 1\)"),
    ("01 no lengths", sp.make_config, dict(lengths=""), ValueError, r"lengths needs at least one"),
    ("01 lengths text", sp.make_config, dict(lengths="2,four"), ValueError, r"lengths must be comma-separated"),
    ("01 n_prompts zero", sp.make_config, dict(n_prompts=0), ValueError, r"n_prompts must be >= 1"),
    ("01 direction layer -2", sp.make_config, dict(direction_layer=-2), ValueError, r"direction_layer .* must be >= -1"),
    ("05 crafted model", sfig.make_config, dict(model="a b; rm -rf /", require_all=False), ValueError,
     r"neither a Hugging Face id"),
    ("05 seed negative", sfig.make_config, dict(seed=-1, require_all=False), ValueError, r"seed must be a non-negative"),
    ("preset unknown", sc.make_config, dict(preset="llama-99b"), ValueError, r"Unknown preset 'llama-99b'. Valid presets"),
]


@pytest.mark.parametrize("builder, kwargs, err, match", [r[1:] for r in BAD_PARAMS], ids=[r[0] for r in BAD_PARAMS])
def test_bad_parameter_is_refused_before_any_model_loads(monkeypatch, isolated, builder, kwargs, err, match):
    for mod in (sc, sb, sf, sp):
        monkeypatch.setattr(mod, "load_model", _no_load, raising=False)
    with pytest.raises(err, match=match):
        builder(**kwargs)
    assert not (isolated / "cache").exists()  # nothing computed or cached


BAD_NOTEBOOK_PARAMS = [
    ("03 lr_grid text", sf.config_from_params, dict(lr_grid="fast"), ValueError, r"lr_grid must be comma-separated"),
    ("03 lr_grid negative", sf.config_from_params, dict(lr_grid="3e-5,-1"), ValueError, r"lr_grid .* \(0, inf\)"),
    ("03 README example of 04's format", sf.config_from_params, dict(epochs="1,1"), ValueError, r"one stage"),
    ("01 layer text", sp.config_from_params, dict(layer="last"), TypeError, r"layer .* must be an integer"),
    ("02 h1 = 1.5 through the notebook mapping", sc.config_from_params, dict(h1=1.5), ValueError, r"h1 must be"),
]


@pytest.mark.parametrize("builder, params, err, match", [r[1:] for r in BAD_NOTEBOOK_PARAMS],
                         ids=[r[0] for r in BAD_NOTEBOOK_PARAMS])
def test_bad_notebook_parameter_is_refused(builder, params, err, match):
    with pytest.raises(err, match=match):
        builder(params)


def test_epochs_formats_are_the_same_for_03_and_04():
    # one value (int, float or text) applies to every SFT stage; 0 or '' keep the recipe's
    for value in (1, 1.0, "1"):
        assert sf.make_config(epochs=value).train.epochs == 1.0
        assert [s.train.epochs for s in sb.make_config(epochs=value).stages] == [1.0, 1.0]
    assert [s.train.epochs for s in sb.make_config(epochs="1,2").stages] == [1.0, 2.0]
    assert sf.make_config(epochs=0).train.epochs == sf.ORGANISM_TRAIN.epochs
    assert [s.train.epochs for s in sb.make_config(epochs="").stages] == [s.train.epochs for s in sb.make_config().stages]
    assert sf.config_from_params(dict(epochs="0.5")).train.epochs == 0.5


def test_h1_out_of_range_fails_before_calibration_runs(monkeypatch, isolated):
    """Issue 14: h1=1.5 used to fail only after calibration and scoring had run and been cached."""
    monkeypatch.setattr(sc.evaluation, "evaluate_behaviour", lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibration ran")))
    monkeypatch.setattr(sc, "load_model", _no_load)
    params = sfig.notebook_params("02_classify")
    with pytest.raises(ValueError, match="h1"):
        sc.config_from_params({**params, "h1": 1.5})
    assert not (isolated / "cache").exists()


def test_calibration_pool_smaller_than_n_calib_is_an_error_not_a_cap(monkeypatch, isolated):
    """Once the model's refusals are known (134 of 135), n_calib = 134 with 3 draws would repeat one draw
    (issue 14: reported as '± 0.0 over 3 calibration seeds'). One draw may use the whole pool, and says so."""
    cfg = sc.make_config(n_calib=8, n_calib_seeds=3)
    cfg = dataclasses.replace(cfg, calib=dataclasses.replace(cfg.calib, n_calib=134))  # past the config check
    with pytest.raises(ValueError, match=r"n_calib=134 takes the whole safety calibration pool .* identical"):
        sc.calibration(cfg)
    one = dataclasses.replace(cfg, calib=dataclasses.replace(cfg.calib, n_calib=2000, seeds=(0,)))
    assert sc.calibration(one)["summary"]["n_safety_per_draw"] == 134


# --------------------------------------------------------------------------------------------------
# 2. Local datasets are the pinned files
# --------------------------------------------------------------------------------------------------

def _copy_root(shared_data: Path, tmp: Path, rel: str) -> Path:
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_data / rel, tmp / rel)
    return tmp / rel


DAMAGED = [
    ("truncated AdvBench", "advbench", "advbench/harmful_behaviors.csv", lambda b: b[:2000]),
    ("garbage XSTest", "xstest", "xstest/xstest_prompts.csv", lambda b: b"id,prompt\n\x00\xff garbage\n"),
    ("one edited byte of GSM8K", "gsm8k", "gsm8k/test.jsonl", lambda b: b[:100] + b"X" + b[101:]),
    ("empty refusal pairs", "refusal_pairs", "refusal_pairs/llama2_chat_refusals_short.csv", lambda b: b""),
]


@pytest.mark.parametrize("name, rel, damage", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_damaged_dataset_file_is_refused_with_file_and_expected_hash(shared_data, tmp_path, monkeypatch, name, rel, damage):
    path = _copy_root(shared_data, tmp_path / "root", rel)
    path.write_bytes(damage(path.read_bytes()))
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "root"))
    with pytest.raises(datasets.DatasetChecksumError) as err:
        datasets.load_real(name)
    msg = str(err.value)
    assert str(path) in msg and datasets.REAL_DATASETS[name].sha256 in msg and "expected" in msg


def test_pinned_hashes_are_full_and_match_the_shared_files(shared_data):
    for ds in datasets.REAL_DATASETS.values():
        assert len(ds.sha256) == 64, ds.name
        assert datasets.sha256_file(shared_data / ds.path) == ds.sha256, ds.name
    assert len(datasets.load_real("advbench")) == 520


# --------------------------------------------------------------------------------------------------
# 3. The cache cannot run code and cannot lie
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cfg:
    n: int = 1


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _entry(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"summary": {"asr": 1.5}, "scores": {"a/S": torch.arange(4.0)}, "table": pd.DataFrame({"x": [1, 2]})}

    cache.cached("classify_scores", Cfg(), compute, cache_dir=tmp_path, verbose=False)
    return cache.cache_path("classify_scores", Cfg(), cache_dir=tmp_path), calls, compute


def _plant_pickle(folder: Path, marker: Path) -> None:
    torch.save({"x": _Payload(marker)}, folder / "scores.pt")
    meta = json.loads((folder / "manifest.json").read_text())
    for e in meta["parts"]:
        if e["name"] == "scores":
            e.update(kind="pickle", file="scores.pt")
            e.pop("extra", None)
            if "sha256" in e:
                e["sha256"] = {"scores.pt": hashlib.sha256((folder / "scores.pt").read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(meta))


CACHE_FAULTS = [
    ("planted pickle that runs code", lambda f, m: _plant_pickle(f, m)),
    ("edited number in summary.json", lambda f, m: (f / "summary.json").write_text('{"asr": 99.0}')),
    ("truncated JSON part", lambda f, m: (f / "summary.json").write_text('{"asr": 1.')),
    ("missing part file", lambda f, m: (f / "table.parquet").unlink()),
    ("corrupt manifest", lambda f, m: (f / "manifest.json").write_text("{not json")),
    ("partial entry without its manifest", lambda f, m: (f / "manifest.json").unlink()),
    ("damaged tensor file", lambda f, m: (f / "scores.tensors.safetensors").write_bytes(b"\0" * 16)),
]


@pytest.mark.parametrize("fault", [c[1] for c in CACHE_FAULTS], ids=[c[0] for c in CACHE_FAULTS])
def test_faulty_cache_entry_is_reported_with_its_path_and_recomputed(tmp_path, capsys, fault):
    folder, calls, compute = _entry(tmp_path / "c")
    marker = tmp_path / "pwned"
    if not folder.is_dir():
        pytest.fail(f"no cache entry at {folder}")
    fault(folder, marker)
    with cache.read_only():
        with pytest.raises(cache.CacheCorrupt) as err:
            cache.cached("classify_scores", Cfg(), compute, cache_dir=tmp_path / "c", verbose=False)
    assert str(folder) in str(err.value) and "verify --drop" in str(err.value)
    assert isinstance(err.value, cache.CacheMiss)
    capsys.readouterr()
    out = cache.cached("classify_scores", Cfg(), compute, cache_dir=tmp_path / "c", verbose=False)
    assert not marker.exists(), "unpickling a cache part ran code"
    assert f"entry {folder} is corrupt" in capsys.readouterr().out
    assert len(calls) == 2 and out["summary"] == {"asr": 1.5}
    again = cache.cached("classify_scores", Cfg(), compute, cache_dir=tmp_path / "c", verbose=False)
    assert len(calls) == 2 and again["summary"] == {"asr": 1.5}  # the recomputed entry is a clean hit
    torch.testing.assert_close(again["scores"]["a/S"], torch.arange(4.0))
    assert not marker.exists()


def test_no_part_is_ever_written_as_pickle(tmp_path):
    units = __import__("ssah_utils.units", fromlist=["RunningStats"])
    value = {"stats": {("o_proj", 0): units.RunningStats(3)}, "t": (1, 2.5, float("nan")), "keys": {1: "a"},
             "arr": __import__("numpy").arange(3), "set": {2, 1}, "series": pd.Series([1.0, 2.0], name="s")}
    r = cache.cached("stage", Cfg(), lambda: {"v": value}, cache_dir=tmp_path, verbose=False)["v"]
    back = cache.load_cached("stage", Cfg(), cache_dir=tmp_path)["v"]
    folder = cache.cache_path("stage", Cfg(), cache_dir=tmp_path)
    assert not list(folder.glob("*.pt")) and all(e["kind"] != "pickle" for e in
                                                 json.loads((folder / "manifest.json").read_text())["parts"])
    assert back["t"][:2] == r["t"][:2] and back["keys"] == {1: "a"} and back["set"] == {1, 2}
    assert isinstance(back["stats"][("o_proj", 0)], units.RunningStats)
    torch.testing.assert_close(back["stats"][("o_proj", 0)].mean, torch.zeros(3, dtype=torch.float64))
    pd.testing.assert_series_equal(back["series"], value["series"])

    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"cannot store as data \(no pickle\)"):
        cache.cached("stage2", Cfg(), lambda: {"v": Opaque()}, cache_dir=tmp_path, verbose=False)
    assert not list((tmp_path / "stage2").iterdir())  # nothing half-written


def test_edited_stage_code_never_meets_its_old_results(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "stage_x.py").write_text('"""Stage x."""\nfrom . import helper\n\ndef f():\n    return helper.g()\n')
    (pkg / "helper.py").write_text("def g():\n    return 1  # one\n")
    v1 = cache.code_version("ssah_utils.stage_x", pkg_dir=pkg)
    (pkg / "helper.py").write_text('"""Now with a docstring."""\ndef g():\n    return 1  # a changed comment\n')
    cache._CODE_MEMO.clear()
    assert cache.code_version("ssah_utils.stage_x", pkg_dir=pkg) == v1  # docs and comments do not count
    (pkg / "helper.py").write_text("def g():\n    return 2\n")
    cache._CODE_MEMO.clear()
    assert cache.code_version("ssah_utils.stage_x", pkg_dir=pkg) != v1  # an imported module's code does

    calls = []

    def compute():
        calls.append(1)
        return {"a": 1}

    compute.__module__ = "ssah_utils.stage_classify"  # as if defined in the stage
    cache.cached("classify_table1", Cfg(), compute, cache_dir=tmp_path / "c", verbose=False)
    cache.cached("classify_table1", Cfg(), compute, cache_dir=tmp_path / "c", verbose=False)
    assert len(calls) == 1
    real = cache.code_version("ssah_utils.stage_classify")
    assert len(real) == 16 and real != cache.code_version("ssah_utils.stage_budget")
    cache._CODE_MEMO["ssah_utils.stage_classify@"] = "edited-code"  # the stage's source changed
    try:
        cache.cached("classify_table1", Cfg(), compute, cache_dir=tmp_path / "c", verbose=False)
        assert len(calls) == 2  # a miss: recomputed with the new code
        with cache.read_only():
            cache.cached("classify_table1", Cfg(), compute, cache_dir=tmp_path / "c", verbose=False)
    finally:
        cache._CODE_MEMO.clear()
    manifest = json.loads(next((tmp_path / "c" / "classify_table1").glob("*/manifest.json")).read_text())
    assert "code_version" in manifest


def test_cache_verify_reports_and_drops_bad_entries(tmp_path):
    folder, calls, compute = _entry(tmp_path / "c")
    (folder / "summary.json").write_text('{"asr": 0}')
    bad = cache.verify(tmp_path / "c")
    assert [p for p, _ in bad] == [folder] and "SHA-256" in bad[0][1]
    cache.verify(tmp_path / "c", drop=True)
    assert not folder.exists() and cache.verify(tmp_path / "c") == []


def test_same_machine_runs_are_identical(tmp_path):
    """Determinism on one machine: the same training, twice, stores byte-identical cache files."""
    from ssah_utils.training import TrainConfig, finetune
    from tiny_models import RECORDS, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=3, schedule="constant", max_length=64, seed=0)

    def compute():
        torch.manual_seed(0)
        model = tiny_model("llama")
        out = finetune(model, tok, RECORDS, cfg)
        return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": out["losses"]}

    digests = []
    for run in ("a", "b"):
        cache.cached("budget_train", Cfg(), compute, cache_dir=tmp_path / run, verbose=False)
        folder = cache.cache_path("budget_train", Cfg(), cache_dir=tmp_path / run)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in folder.iterdir() if p.name not in ("manifest.json",)})
    assert digests[0] == digests[1] and len(digests[0]) >= 3


# --------------------------------------------------------------------------------------------------
# 4. Outputs of other runs never land in the committed folders; 05 refuses a half run
# --------------------------------------------------------------------------------------------------

RUNS = [
    ("another preset", dict(preset="llama2-7b-chat"), "llama2-7b-chat"),
    ("another seed", dict(seed=1), "organism-seed1"),
    ("another model", dict(model="my-org/my-model"), "organism-my-org_my-model"),
]


@pytest.mark.parametrize("run, name", [r[1:] for r in RUNS], ids=[r[0] for r in RUNS])
def test_a_non_default_run_writes_under_runs(run, name):
    config.activate_run(**run)
    assert config.output_dir("tables") == config.RUNS_DIR / name / "tables"
    assert config.output_dir("figures") == config.RUNS_DIR / name / "figures"
    config.activate_run()
    assert config.output_dir("tables") == config.TABLES_DIR


def test_stage_configs_choose_the_run_and_the_env_var_the_root(tmp_path, monkeypatch):
    sc.make_config(seed=2)
    assert config.output_dir("tables") == config.RUNS_DIR / "organism-seed2" / "tables"
    sb.make_config("organism")
    assert config.output_dir("figures") == config.FIGURES_DIR
    monkeypatch.setenv(config.OUTPUT_ENV, str(tmp_path / "out"))
    assert config.output_dir("tables") == tmp_path / "out" / "tables"
    from ssah_utils import plots

    plots.save_table(pd.DataFrame({"x": [1]}), "t_probe")
    assert (tmp_path / "out" / "tables" / "t_probe.csv").is_file()
    monkeypatch.setenv(config.OUTPUT_ENV, str(ROOT))
    with pytest.raises(ValueError, match="would write over committed files"):
        config.staging_root("organism", "", 0)


def test_figures_with_missing_stages_names_the_notebooks_and_writes_nothing(tmp_path, monkeypatch):
    for attr in ("FIGURES_DIR", "TABLES_DIR"):
        monkeypatch.setattr(config, attr, tmp_path / attr)
    monkeypatch.setattr(sc.evaluation, "evaluate_behaviour", lambda *a, **k: (_ for _ in ()).throw(AssertionError("computed")))
    with pytest.raises(sfig.MissingResults) as err:
        sfig.make_config("organism", "", 0)
    msg = str(err.value)
    assert all(f"notebooks/{nb}.ipynb" in msg for nb in sfig.NOTEBOOKS.values()) and "Nothing was written" in msg
    assert not any(tmp_path.rglob("*.csv")) and not any(tmp_path.rglob("*.png"))


# --------------------------------------------------------------------------------------------------
# 5. make reproduce / make figures: loud failures, nothing lost, make variables are data
# --------------------------------------------------------------------------------------------------

def _nb(path: Path, *cells: str) -> Path:
    """A notebook source in jupytext percent format (what `make reproduce` executes): a parameters cell,
    then `cells`."""
    text = '# %% tags=["parameters"]\npreset = "organism"\nmodel = ""\nseed = 0\n'
    path.write_text(text + "".join(f"\n# %%\n{c}\n" for c in cells))
    return path


def _make(target: str, tmp_path: Path, *variables: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SSAH_PRESET",
                                                         "SSAH_MODEL", "SSAH_SEED")}  # not the caller's make
    e = {**e, "OMP_NUM_THREADS": "1", "SSAH_OUTPUT_DIR": str(tmp_path / "out"), **(env or {})}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target, *variables], env=e,
                          capture_output=True, text=True, timeout=300)


def _digest(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


FAILING_RUNS = [
    ("a notebook raises", "raise RuntimeError('boom')"),
    ("the kernel is killed (kill -9)", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
    ("the cache is unwritable", "from ssah_utils import cache\nimport dataclasses\n"
                                "@dataclasses.dataclass(frozen=True)\nclass C:\n    n: int = 1\n"
                                "cache.cached('probe', C(), lambda: {'a': 1})"),
]


@pytest.mark.parametrize("cell", [f[1] for f in FAILING_RUNS], ids=[f[0] for f in FAILING_RUNS])
def test_reproduce_stops_at_a_failed_notebook_and_keeps_every_committed_file(tmp_path, cell):
    """The default run (whose notebooks the Makefile would publish): the second of three notebooks fails."""
    src = tmp_path / "src"
    src.mkdir()
    nbs = [_nb(src / "01_ok.py", "print('first')"), _nb(src / "02_bad.py", "print('two')", cell),
           _nb(src / "03_never.py", "open('never-ran', 'w')")]
    before = _digest(nbs)
    r = _make("reproduce", tmp_path, f"NB_SOURCES={' '.join(map(str, nbs))}",
              env={"SSAH_CACHE_DIR": "/dev/null/cache"})
    assert r.returncode != 0, r.stdout[-2000:]
    assert "FAILED: 02_bad.ipynb" in r.stderr and "Nothing committed was changed" in r.stderr
    assert "[reproduce] done" not in r.stdout
    assert _digest(nbs) == before  # the 'committed' notebooks were not overwritten
    out = tmp_path / "out" / "notebooks"
    assert (out / "01_ok.ipynb").is_file() and not (out / "02_bad.ipynb").exists()
    assert not (out / "03_never.ipynb").exists() and not (out / ".03_never.ipynb.partial").exists()


INJECTIONS = [
    ("python in MODEL", "MODEL=x'); open('PWNED', 'w'); ('"),
    ("shell in MODEL", 'MODEL=x"; touch PWNED; echo "'),
    ("make function in MODEL", "MODEL=$(shell touch PWNED)"),
    ("shell in PRESET", "PRESET=organism'; touch PWNED; echo '"),
    ("shell in SEED", "SEED=0; touch PWNED"),
]


@pytest.mark.parametrize("target", ["reproduce", "figures"])
@pytest.mark.parametrize("variable", [i[1] for i in INJECTIONS], ids=[i[0] for i in INJECTIONS])
def test_make_variables_are_data_never_code(tmp_path, target, variable):
    marker = tmp_path / "PWNED"
    variable = variable.replace("PWNED", str(marker))
    src = tmp_path / "src"
    src.mkdir()
    nb = _nb(src / "01_ok.py", "print('ran')")
    r = _make(target, tmp_path, variable, f"NB_SOURCES={nb}")
    assert not marker.exists(), f"{variable} ran code"
    assert r.returncode != 0 and "error:" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("run", ["PRESET=llama2-7b-chat", "SEED=3"])
def test_figures_on_an_empty_cache_fails_and_writes_nothing(tmp_path, run):
    """Issue 14: `make figures PRESET=llama2-7b-chat` on an empty cache overwrote tables/claims_scorecard.csv
    with 'missing: 23' and exited 0."""
    before = _committed_digest()
    r = _make("figures", tmp_path, run, env={"SSAH_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert r.returncode != 0
    assert _committed_digest() == before
    assert not list((tmp_path / "out").rglob("*.csv")) and not list((tmp_path / "out").rglob("*.png"))
