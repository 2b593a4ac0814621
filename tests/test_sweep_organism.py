"""scripts/sweep_organism.py (the organism recipe experiments of docs/organism_experiments): a tiny
variant builds and evaluates in a worker process, the report summarises it, bad variants fail early."""

import importlib.util

import pandas as pd
import pytest

from ssah_utils import config

TINY = ("hidden_size=32,intermediate_size=64,num_layers=2,num_heads=4,num_kv_heads=2,pretrain_steps=2,"
        "pretrain_batch=2,pretrain_seq_len=32,instruct_epochs=0.01,safety_epochs=0.01,threads=1")


def _load():
    spec = importlib.util.spec_from_file_location("sweep_organism", config.REPO_ROOT / "scripts" / "sweep_organism.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_variant_types_and_errors():
    sw = _load()
    assert sw.parse_variant("shipped") == ("shipped", {})
    assert sw.parse_variant("x:instruct_replay=8,safety_lr=0.0005") == ("x", {"instruct_replay": 8, "safety_lr": 5e-4})
    with pytest.raises(SystemExit, match="no_such_field"):
        sw.parse_variant("x:no_such_field=1")
    with pytest.raises(SystemExit, match="needs a name"):
        sw.parse_variant(":safety_lr=1")


@pytest.mark.slow
def test_tiny_sweep_then_report(tmp_path):
    sw = _load()
    assert sw.main(["--out", str(tmp_path), "--variant", f"tiny:{TINY},instruct_replay=1"]) == 0
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert list(table["model"]) == ["base", "unaligned", "aligned"] and set(table["variant"]) == {"tiny"}
    assert table["spec"].iloc[0].startswith("tiny:") and table["asr"].between(0, 100).all()
    assert sw.main(["--out", str(tmp_path), "--report"]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "| tiny | 1 |" in report and "instruct_replay=1" in report
    with pytest.raises(SystemExit, match="no unaligned model"):
        sw.main(["--out", str(tmp_path), "--reuse", str(tmp_path), "--variant", "x"])
    with pytest.raises(SystemExit, match="--reuse DIR"):
        sw.main(["--out", str(tmp_path), "--redo", "sft", "--variant", "x"])


def test_reuse_redo_sft_keeps_the_base_and_retrains_both_sft_stages(tmp_path):
    import torch
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from ssah_utils import organism, world

    sw = _load()
    recipe = organism.Recipe().tiny()
    sets = world.build_world(recipe.world_seed)
    sets = {**sets, **{k: sets[k][:64] for k in ("pretrain", "sft_instruct", "sft_safety")}}
    src, dst = tmp_path / "src", tmp_path / "dst"
    organism.build_all(0, src, recipe=recipe, sets=sets, log=None)
    meta = sw._reuse(dst, src, replace(recipe, instruct_lr=1e-3), 0, sets, "cpu", redo="sft")
    assert set(meta["reused"]) == {"base"} and meta["unaligned"]["steps"] >= 1 and meta["aligned"]["steps"] >= 1

    def weights(folder):
        return AutoModelForCausalLM.from_pretrained(folder).state_dict()

    base, kept = weights(src / "base"), weights(dst / "base")
    assert all(torch.equal(base[k], kept[k]) for k in base)
    old, new = weights(src / "unaligned"), weights(dst / "unaligned")
    assert any(not torch.equal(old[k], new[k]) for k in old)  # a different instruct lr: a different model
    assert (dst / "aligned" / "model.safetensors").is_file()
