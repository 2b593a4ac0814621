"""One-shot check of the real-model code path (bf16, CUDA) on tiny random models and the organism.

What users run on Llama-2/3, Mistral and Qwen2 with a GPU goes through `models.load_model` with a dtype
and a device, then the stage modules. This script runs that path, at the smallest sizes the tests use,
on whatever device and dtype it is given, for each supported family:

- `llama2`  Llama-2-like: multi-head attention (4 heads, 4 k/v heads);
- `llama3`  Llama-3-like: grouped-query attention (4 heads over 2 k/v heads), llama3 rope scaling;
- `mistral` Mistral: GQA 4/2;
- `qwen2`   Qwen2: GQA 4/2 with q/k/v biases.

Each is a 2-layer random model built from `tests/tiny_models.tiny_config`, saved with `save_pretrained`
beside the organism's word tokenizer (so the world's prompt sets tokenise; no hub, no internet), then:

1. `load`      `load_model(path, dtype=, device=)`: the dtype and device actually obtained;
2. `generate`  `generation.generate` in chat style, finite logits, perplexity;
3. `probe`     `stage_probe`: cosine distances, activations + linear probes, refusal direction with
               generation that records the residual at every token;
4. `classify`  `stage_classify`: calibration pairs, WIFV / Wanda / SNIP scores, ESU/EUU/CU/RU labels;
5. `ablate`    `ablation.ablate` of the ESU+RU with bias compensation (changes the logits, restored bit
               for bit) and `stage_classify.table1` (every removal condition, evaluated);
6. `freeze`    `stage_freeze.run` (fine-tuning with ESU + top CU frozen, `training.verify_frozen` must say
               0 moved), and a direct `training.finetune` with gradient accumulation at the real recipe's
               learning rate (2e-5) with half the units frozen: 0 moved frozen entries, and the share of
               trainable entries that moved (pure bf16 weights can round small updates away);
7. `budget`    `stage_budget.train_run` (RU-only alignment SFT: 0 entries moved outside the RU) and
               `evaluate_run` (the cached CPU state loaded back into a model on the device).

Then `engines` (unless `--engines ""`): `scripts/distributed_check.py` under torchrun for DDP and FSDP2, one
process per visible GPU on cuda (a single GPU runs one process: the engines' CUDA/NCCL/bf16 path, nothing to
compare across ranks), two gloo processes on cpu; its checks (exact freezing, the match with one process,
bf16 through float32 master weights) are the step's result.

Then once, `organism`: the shipped aligned organism loaded on the device/dtype, greedy answers to
prompts of the world's harmful_test and utility_test, oracle verdicts compared with the same run on
CPU float32 in the same process (agreement fraction).

Writes OUTDIR/gpu_check.json (everything, with the environment) and OUTDIR/gpu_check.md (a table
family x step -> ok/FAIL, seconds, peak CUDA memory). Exit code 0 only if every step passed.

    python bench/gpu_check.py --device cuda --dtype bfloat16 --out OUTDIR
    OMP_NUM_THREADS=1 python bench/gpu_check.py --device cpu --dtype float32 --out /tmp/gpu_check
"""

from __future__ import annotations

import os

# Before torch is imported: in case anything turns on deterministic algorithms on CUDA.
os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub, no internet: everything is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SSAH_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from ssah_utils import config, stage_freeze  # noqa: E402

FAMILIES = ("llama2", "llama3", "mistral", "qwen2")
STEPS = ("load", "generate", "probe", "classify", "ablate", "freeze", "budget")
REAL_LR = stage_freeze.REAL_TRAIN.lr  # the real recipe's lr (Qi et al. 2023), used for the bf16 update check


# --------------------------------------------------------------------------------------------------
# Tiny models of each family
# --------------------------------------------------------------------------------------------------

def family_config(family: str, vocab_size: int):
    """The tiny config of a family (tests/tiny_models.tiny_config: 2 layers, d 32, d_mlp 48, 4 heads)."""
    from tiny_models import tiny_config

    if family == "llama2":  # multi-head attention, as Llama-2-7B
        return tiny_config("llama", vocab_size=vocab_size, num_key_value_heads=4)
    if family == "llama3":  # GQA and Llama-3.1's rope scaling
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return tiny_config("llama", vocab_size=vocab_size, rope_parameters=rope)
    if family == "mistral":
        return tiny_config("mistral", vocab_size=vocab_size)
    if family == "qwen2":
        return tiny_config("qwen2", vocab_size=vocab_size)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


# Llama-3 and Qwen2 use byte-level BPE tokenizers; Llama-2 and Mistral SentencePiece (the organism's word
# tokenizer stands in for those). Transformers 5 also loads any tokenizer of a qwen2 model as Qwen2Tokenizer,
# which rebuilds a byte-level pipeline over the vocabulary, so a word-level vocabulary cannot serve there.
BYTE_LEVEL = ("llama3", "qwen2")


def bpe_tokenizer(world: dict, vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on the world's text (no download), with the organism's special
    tokens at the same ids (pad 0, unk 1, bos 2, eos 3) and its Llama-2-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ssah_utils.organism import CHAT_TEMPLATE, SPECIALS

    texts = [f"{r['prompt']} {r.get('reference', '')}" for name in ("sft_instruct", "sft_safety", "calib_utility")
             for r in world[name]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny(family: str, folder: Path, world: dict) -> Path:
    """A random float32 model of `family` with a tokenizer (organism's word tokenizer, or a byte-level BPE
    for `BYTE_LEVEL` families) and the organism's chat template, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = bpe_tokenizer(world) if family in BYTE_LEVEL else AutoTokenizer.from_pretrained(config.ORGANISM_DIR / "aligned")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tok)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# Step bookkeeping
# --------------------------------------------------------------------------------------------------

class Checker:
    """Runs steps, each in a try/except, recording ok, seconds, peak CUDA memory, info and traceback."""

    def __init__(self, device: str, log=print):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.results: list[dict] = []
        self.log = log

    def run(self, family: str, step: str, fn) -> dict | None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rec = {"family": family, "step": step, "ok": False, "seconds": None, "peak_mem_mb": None, "info": {},
               "error": None}
        out = None
        try:
            out = fn(rec["info"])
            if self.cuda:
                torch.cuda.synchronize()
            rec["ok"] = True
        except Exception as err:  # noqa: BLE001 - one failure must not stop the other checks
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = traceback.format_exc()
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        if self.cuda:
            try:
                rec["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            except Exception:  # noqa: BLE001 - a broken CUDA context is reported by the step's error
                pass
        self.results.append(rec)
        mem = f", peak {rec['peak_mem_mb']} MiB" if rec["peak_mem_mb"] is not None else ""
        self.log(f"[{family:>8}] {step:<9} {'ok  ' if rec['ok'] else 'FAIL'} {rec['seconds']:7.2f} s{mem}"
                 + ("" if rec["ok"] else f"  {rec['error'][:300]}"))
        return out


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def _finite(x) -> bool:
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(list(x) if not hasattr(x, "tolist") else x.tolist(), dtype=torch.float64)
    return bool(torch.isfinite(x.double()).all())


def _df_finite(df, cols) -> bool:
    return all(_finite(df[c].to_numpy(dtype="float64")) for c in cols if c in df)


def _params_state(model) -> dict:
    ps = list(model.parameters())
    return {"param_dtypes": sorted({str(p.dtype) for p in ps}), "param_devices": sorted({str(p.device) for p in ps}),
            "n_params": sum(p.numel() for p in ps)}


def _check_on(model, device: str, dtype: torch.dtype) -> None:
    st = _params_state(model)
    want = torch.device(device)
    devs = {torch.device(d) for d in st["param_devices"]}
    need(all(d.type == want.type and (want.index is None or d.index == want.index) for d in devs),
         f"parameters on {st['param_devices']}, wanted {device}")
    need(st["param_dtypes"] == [str(dtype)], f"parameter dtypes {st['param_dtypes']}, wanted {dtype}")


# --------------------------------------------------------------------------------------------------
# Per-family steps
# --------------------------------------------------------------------------------------------------

def check_family(ck: Checker, family: str, folder: Path, device: str, dtype: str, tdtype: torch.dtype,
                 world: dict) -> None:
    from ssah_utils import evaluation, generation
    from ssah_utils import stage_budget as sb
    from ssah_utils import stage_classify as sc
    from ssah_utils import stage_freeze as sf
    from ssah_utils import stage_probe as sp
    from ssah_utils import training
    from ssah_utils.ablation import ablate
    from ssah_utils.models import UnitMask, adapter_for, load_model

    spec = str(folder)
    loaded: dict = {}

    def s_load(info):
        model, tok = load_model(spec, dtype=dtype, device=device)
        info.update(_params_state(model))
        info["adapter"] = repr(adapter_for(model))
        info["chat_template"] = bool(getattr(tok, "chat_template", None))
        _check_on(model, device, tdtype)
        loaded["m"] = (model, tok)

    ck.run(family, "load", s_load)
    if "m" not in loaded:
        for step in STEPS[1:]:
            ck.results.append({"family": family, "step": step, "ok": False, "seconds": 0.0, "peak_mem_mb": None,
                               "info": {}, "error": "skipped: load failed"})
        return
    model, tok = loaded["m"]

    def s_generate(info):
        prompts = [r["prompt"] for r in world["harmful_test"][:3] + world["utility_test"][:3]]
        enc = generation.encode_prompts(tok, prompts, style="chat")
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        need(logits.device.type == torch.device(device).type, f"logits on {logits.device}")
        info["logits_dtype"] = str(logits.dtype)
        need(bool(torch.isfinite(logits.float()).all()), "non-finite logits")
        outs = generation.generate(model, tok, prompts, style="chat", max_new_tokens=8, batch_size=4)
        need(len(outs) == len(prompts) and all(isinstance(o, str) for o in outs), "generate returned wrong outputs")
        pre = generation.generate(model, tok, prompts[:2], style="chat", prefill="sure , here is", max_new_tokens=4)
        need(all(o.startswith("sure , here is") for o in pre), f"prefill not kept: {pre}")
        info["example"] = outs[0][:80]
        ppl = evaluation.perplexity(model, tok, [r["prompt"] + " " + r["reference"] for r in world["ppl_heldout"][:4]])
        need(math.isfinite(ppl), f"perplexity {ppl}")
        info["ppl"] = ppl

    ck.run(family, "generate", s_generate)

    # 01_probe
    pcfg = sp.make_config("organism", n_prompts=4, lengths=(2, 4), n_per_class=16, n_per_group=2, max_new_tokens=6)
    pcfg = dataclasses.replace(pcfg, models=(("aligned", spec),), dtype=dtype, device=device)

    def s_probe(info):
        dist = sp.distances(pcfg, roles=("aligned",))
        need(len(dist) > 0 and _df_finite(dist, ["distance"]), "distances empty or not finite")
        H = sp.activations(pcfg, "aligned")
        need(H.dtype == torch.float32 and H.device.type == "cpu" and _finite(H), f"activations {H.dtype} {H.device}")
        acc = sp.probes(pcfg)
        need(len(acc) == H.shape[1] and _df_finite(acc, ["test_acc"]), "probe table")
        dr = sp.direction(pcfg, "aligned")
        req = dr["requests"]
        need(len(req) > 0 and _df_finite(req, ["score0"]) and len(dr["tokens"]) > 0, "direction results")
        ex = sp.seed_example(pcfg, "aligned")
        need(len(ex["pairs"]) == 2 and _df_finite(ex["tokens"], ["score"]), "seed example")
        info.update({"n_distance_rows": len(dist), "activations": list(H.shape), "point": int(dr["point"]),
                     "probe_test_acc_last": float(acc["test_acc"].iloc[-1]), "direction_requests": len(req)})

    ck.run(family, "probe", s_probe)

    # 02_classify
    ccfg = sc.make_config("organism", n_calib=8, n_calib_seeds=1, n_eval=4, n_random_seeds=1,
                          safety_responses="reference", batch_size=8)
    ccfg = dataclasses.replace(ccfg, model=spec, dtype=dtype, device=device,
                               eval=dataclasses.replace(ccfg.eval, max_new_tokens=8, n_ppl=4),
                               calib=dataclasses.replace(ccfg.calib, max_new_tokens=8))
    got: dict = {}

    def s_classify(info):
        cal = sc.calibration(ccfg)
        res = sc.scores(ccfg)
        for k, v in res["scores"].items():
            need(v.dtype == torch.float64 and v.device.type == "cpu" and _finite(v), f"score {k}: {v.dtype} {v.device}")
        lab = sc.labels(ccfg)
        counts = {k: int(v) for k, v in zip(*torch.unique(torch.tensor([["ESU", "EUU", "CU", "RU"].index(x)
                                                                         for x in lab.labels]), return_counts=True))}
        info["labels"] = {["ESU", "EUU", "CU", "RU"][k]: n for k, n in counts.items()}
        info["scores"] = sorted(res["scores"])
        info["calibration"] = cal["summary"]
        got["labels"] = lab

    ck.run(family, "classify", s_classify)

    def s_ablate(info):
        lab = got.get("labels") or sc.labels(ccfg)
        mask = lab.mask("ESU") | lab.mask("RU")
        need(not mask.is_empty(), "empty ESU+RU mask")
        means = sc._means(ccfg, f"seed_{ccfg.calib.seeds[0]}")
        ids = generation.encode_prompts(tok, [world["harmful_test"][0]["prompt"]], style="chat")
        ids = {k: v.to(device) for k, v in ids.items()}
        before_w = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            l0 = model(**ids).logits
            with ablate(model, mask, means):
                l1 = model(**ids).logits
                need(bool(torch.isfinite(l1.float()).all()), "non-finite logits while ablated")
            l2 = model(**ids).logits
        need(not torch.equal(l0, l1), "ablation did not change the logits")
        need(torch.equal(l0, l2), "logits not restored after ablation")
        need(all(torch.equal(p, before_w[n]) for n, p in model.named_parameters()), "weights not restored bit for bit")
        need(all(m.bias is None for m in (adapter_for(model).proj(0, "o_proj"), adapter_for(model).proj(0, "down_proj"))),
             "compensation bias left behind")
        t1 = sc.table1(ccfg)
        runs = t1["runs"]
        need(len(runs) == 7, f"table1 has {len(runs)} rows")
        need(_df_finite(runs, ["asr", "utility", "ppl", "pct_params"]), "table1 metrics not finite")
        info.update({"ablated_units": mask.n_units, "max_logit_change": float((l1.float() - l0.float()).abs().max()),
                     "table1_rows": len(runs), "table1_ppl": [round(float(x), 2) for x in runs["ppl"]]})

    ck.run(family, "ablate", s_ablate)

    # 03_freeze
    # make_config reads 02_classify's notebook for the labels' config (nbformat, absent from bare GPU images);
    # the check replaces that config with its own anyway, so take 02's defaults instead of reading the notebook.
    read_nb, sf.classify_config = sf.classify_config, lambda preset, model, seed: sc.make_config(preset, model, seed)
    try:
        fcfg = sf.make_config("organism", n_seeds=1, datasets_=("ft_dolly",), conditions=("full", "freeze_esu_topcu"),
                              n_train=16, epochs=0.5, lr=1e-3, batch_size=8, n_eval=4, relabel=True)
    finally:
        sf.classify_config = read_nb
    fcfg = dataclasses.replace(fcfg, model=spec, dtype=dtype, device=device, classify=ccfg, eval=ccfg.eval)

    def s_freeze(info):
        res = sf.run(fcfg, "ft_dolly", "freeze_esu_topcu", 0)
        m = res["metrics"]
        need(m["frozen_entries"] > 0, "nothing frozen")
        need(m["verify_changed"] == 0 and m["verify_max_abs_diff"] == 0.0,
             f"frozen entries moved: {m['verify_changed']} (max |diff| {m['verify_max_abs_diff']})")
        need(math.isfinite(m["final_loss"]) and math.isfinite(m["set_loss_after"]), "loss not finite")
        info["stage_run"] = {k: m[k] for k in ("frozen_entries", "verify_changed", "verify_max_abs_diff", "steps",
                                               "loss_first", "final_loss", "set_loss_before", "set_loss_after")}
        full = sf.run(fcfg, "ft_dolly", "full", 0)  # every parameter trains, then the model is relabelled
        need(math.isfinite(full["metrics"]["final_loss"]) and _finite(full["z_after"]), "full run / relabel")
        tr = sf.label_transfer(fcfg, "ft_dolly")
        need(tr.shape == (4, 4), f"label transfer {tr.shape}")
        # Direct: gradient accumulation (micro-batches, as REAL_TRAIN) at the real recipe's lr, half the units frozen.
        ft = copy.deepcopy(model)
        mask = UnitMask.random(ft, n_units=adapter_for(ft).n_layers * (adapter_for(ft).d_mlp + adapter_for(ft).n_heads) // 2,
                               seed=0)
        before = training.snapshot(ft)
        recs = [{"prompt": r["prompt"], "reference": r["reference"]} for r in world["ft_dolly"][:8]]
        # 20 steps, so that the accumulated update is larger than a bf16 step of the weights
        tc = training.TrainConfig(epochs=20.0, lr=REAL_LR, batch_size=8, micro_batch_size=4, weight_decay=0.01)
        out = training.finetune(ft, tok, recs, tc, freeze=mask)
        ver = training.verify_frozen(before, ft, mask)
        changed = int(ver["changed"].sum())
        need(changed == 0, f"direct finetune: {changed} frozen entries moved")
        trainable = training.trainable_masks(ft, freeze=mask)
        n_tr = n_mv = 0
        for n, p in ft.named_parameters():
            r = trainable[n]
            if r is False:
                continue
            sel = torch.ones_like(p, dtype=torch.bool) if r is True else r.to(p.device)
            n_tr += int(sel.sum())
            n_mv += int((p.detach() != before[n].to(p.device))[sel].sum())
        # the same run in float32 from the same start: how far this dtype's result lies from it
        ref = copy.deepcopy(model).float()
        start = training.snapshot(ref, device=ref.device)
        training.finetune(ref, tok, recs, tc, freeze=mask)
        rp = dict(ref.named_parameters())
        upd = sum(float((rp[k].detach() - start[k]).norm() ** 2) for k in start) ** 0.5
        dist = sum(float((p.detach().float() - rp[k].detach()).norm() ** 2) for k, p in ft.named_parameters()) ** 0.5
        info["direct"] = {"lr": REAL_LR, "steps": out["steps"], "frozen_entries": int(ver["frozen_entries"].sum()),
                          "frozen_changed": changed, "trainable_entries": n_tr,
                          "trainable_moved_frac": round(n_mv / max(1, n_tr), 4),
                          "master_weights": out["master_weights"],
                          "dist_to_fp32_run": round(dist / max(upd, 1e-30), 4)}
        del ft, ref

    ck.run(family, "freeze", s_freeze)

    # 04_alignment_budget
    bcfg = sb.make_config("organism", ru_frac=0.2, n_seeds=1, conditions="ru_only", alignment="instruct",
                          epochs="0.01", n_calib=8, n_eval=4, batch_size=8)
    bcfg = dataclasses.replace(bcfg, base=spec, reference=spec, dtype=dtype, device=device,
                               eval=dataclasses.replace(bcfg.eval, max_new_tokens=8, n_ppl=4))

    def s_budget(info):
        base, _ = sb.load_base(bcfg)
        _check_on(base, device, tdtype)
        tr = sb.train_run(bcfg, "ru_only", bcfg.seeds[0])
        s = tr["summary"]
        need(s["moved_outside_mask"] == 0, f"{s['moved_outside_mask']} entries moved outside the RU")
        need(_finite(tr["unit_change"]) and bool((tr["unit_change"] > 0).any()), "no RU moved")
        need(all(v.device.type == "cpu" for v in tr["state"].values()), "cached state not on the CPU")
        ev = sb.evaluate_run(bcfg, "ru_only", bcfg.seeds[0])
        need(math.isfinite(ev["metrics"]["ppl"]), "evaluation ppl not finite")
        lab, how = sb.labels_after(bcfg, "ru_only")  # the run saved with save_pretrained, reloaded, relabelled
        need(len(lab.labels) == len(tr["unit_change"]), "labels after alignment")
        info["labels_after_calibration"] = how
        info.update({"moved_outside_mask": s["moved_outside_mask"], "trained_unit_params_pct": s["trained_unit_params_pct"],
                     "steps": int(tr["info"]["steps"].sum()), "units_moved": int((tr["unit_change"] > 0).sum()),
                     "eval_ppl": ev["metrics"]["ppl"]})

    ck.run(family, "budget", s_budget)


# --------------------------------------------------------------------------------------------------
# The organism: the same behaviour on the device as on CPU float32
# --------------------------------------------------------------------------------------------------

def check_organism(ck: Checker, device: str, dtype: str, tdtype: torch.dtype, world: dict, n_prompts: int,
                   min_agreement: float) -> None:
    from ssah_utils import evaluation
    from ssah_utils.models import load_model

    half = max(1, n_prompts // 2)
    recs = world["harmful_test"][:: max(1, len(world["harmful_test"]) // half)][:half]
    recs += world["utility_test"][:: max(1, len(world["utility_test"]) // half)][:half]
    spec = str(config.ORGANISM_DIR / "aligned")
    got: dict = {}

    def run_on(dev: str, dt: str, want: torch.dtype, key: str, info: dict):
        model, tok = load_model(spec, dtype=dt, device=dev)
        _check_on(model, dev, want)
        df = evaluation.evaluate_behaviour(model, tok, recs, style="chat", max_new_tokens=48, batch_size=32)
        got[key] = df
        # rates in %, named as in the evaluation suite (evaluation.METRICS)
        info.update({"n": len(df), "asr": 100 * float((df[df["kind"] == "harmful"]["verdict"] == "harmful").mean()),
                     "refusal": 100 * float((df[df["kind"] == "harmful"]["verdict"] == "refusal").mean()),
                     "utility": 100 * float((df[df["kind"] != "harmful"]["verdict"] == "correct").mean())})
        del model

    ck.run("organism", "generate", lambda info: run_on(device, dtype, tdtype, "dev", info))
    ck.run("organism", "cpu_fp32", lambda info: run_on("cpu", "float32", torch.float32, "cpu", info))

    def s_compare(info):
        need("dev" in got and "cpu" in got, "a run failed")
        a, b = got["dev"], got["cpu"]
        agree = (a["verdict"].to_numpy() == b["verdict"].to_numpy())
        same_text = (a["response"].to_numpy() == b["response"].to_numpy())
        info.update({"verdict_agreement": float(agree.mean()), "identical_responses": float(same_text.mean()),
                     "n": int(len(a)), "min_agreement": min_agreement,
                     "disagreements": [{"prompt": a["prompt"][i], "device": f"{a['verdict'][i]}: {a['response'][i][:80]}",
                                        "cpu_fp32": f"{b['verdict'][i]}: {b['response'][i][:80]}"}
                                       for i in range(len(a)) if not agree[i]][:8]})
        need(agree.mean() >= min_agreement, f"verdict agreement {agree.mean():.3f} < {min_agreement}")

    ck.run("organism", "agreement", s_compare)


# --------------------------------------------------------------------------------------------------
# Environment and report
# --------------------------------------------------------------------------------------------------

def check_engines(ck: Checker, device: str, engines: tuple[str, ...]) -> None:
    """`scripts/distributed_check.py` for each engine, on every visible GPU (cuda) or 2 CPU processes."""
    cuda = device.startswith("cuda")
    nproc = max(1, torch.cuda.device_count()) if cuda else 2
    script = config.REPO_ROOT / "scripts" / "distributed_check.py"
    for engine in engines:
        def run(info: dict, engine=engine) -> None:
            with socket.socket() as sock:  # a free port for the rendezvous
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            out = Path(tempfile.mkdtemp(prefix="ssah_engines_")) / "report.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(port), str(script), "--parallel", engine, "--device", "cuda" if cuda else "cpu",
                   "--min-processes", "1" if cuda else "2", "--out", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            info["processes"] = nproc
            info["stdout"] = [ln for ln in r.stdout.splitlines() if ln.startswith("[distributed]")]
            need(r.returncode == 0 and out.exists(), f"distributed_check.py --parallel {engine} failed "
                 f"(exit {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
            info["checks"] = json.loads(out.read_text())["checks"]
            shutil.rmtree(out.parent, ignore_errors=True)

        ck.run("engines", f"{engine} x{nproc}", run)


def environment(device: str) -> dict:
    from importlib import metadata

    env = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
           "torch": torch.__version__, "git_commit": config.git_commit(), "device_requested": device,
           "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
           "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    for pkg in ("transformers", "tokenizers", "accelerate", "safetensors", "numpy", "pandas"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    if torch.cuda.is_available():
        idx = (torch.device(device).index or 0) if device.startswith("cuda") else 0
        env.update({"cuda": torch.version.cuda, "device_name": torch.cuda.get_device_name(idx),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(idx))),
                    "bf16_supported": torch.cuda.is_bf16_supported(),
                    "total_mem_gb": round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)})
        try:
            env.update({"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.version()})
        except Exception as err:  # noqa: BLE001 - informational only
            env["tf32_matmul"] = f"unknown ({err})"
    else:
        env.update({"device_name": f"cpu ({os.cpu_count()} cores)", "bf16_supported": None})
    return env


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    res = report["results"]
    cell = {(r["family"], r["step"]): r for r in res}

    def table(rows: list[dict]) -> list[str]:
        fams = list(dict.fromkeys(r["family"] for r in rows))
        steps = list(dict.fromkeys(r["step"] for r in rows))
        lines = ["| family | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
        for f in fams:
            row = []
            for s in steps:
                r = cell.get((f, s))
                if r is None:
                    row.append("")
                    continue
                mem = f", {r['peak_mem_mb']:.0f} MiB" if r.get("peak_mem_mb") is not None else ""
                row.append(f"{'ok' if r['ok'] else '**FAIL**'} {r['seconds']:.1f} s{mem}")
            lines.append(f"| {f} | " + " | ".join(row) + " |")
        return lines

    env = report["environment"]
    lines = [f"# gpu_check: {report['device']} / {report['dtype']}", "",
             f"{env.get('device_name')}; torch {env['torch']}, transformers {env['transformers']}, "
             f"bf16 supported: {env.get('bf16_supported')}; commit {env['git_commit']}.", "",
             f"**{'ALL PASSED' if report['passed'] else 'FAILED'}**: {report['n_ok']}/{report['n_steps']} steps ok, "
             f"{report['seconds']:.1f} s in all.", "",
             "Each cell: ok/FAIL, seconds, peak CUDA memory (MiB) where on CUDA.", ""]
    lines += table([r for r in res if r["family"] != "organism"])
    org_rows = [r for r in res if r["family"] == "organism"]
    if org_rows:
        lines += ["", "Organism (data/organism/aligned): on the device, on CPU float32, verdicts compared.", ""]
        lines += table(org_rows)
    org = cell.get(("organism", "agreement"))
    if org and org["info"]:
        i = org["info"]
        lines += ["", f"Organism, {report['device']} {report['dtype']} vs CPU float32: verdict agreement "
                  f"{i.get('verdict_agreement', float('nan')):.3f}, identical responses "
                  f"{i.get('identical_responses', float('nan')):.3f} over {i.get('n')} prompts."]
    direct = {r["family"]: r["info"].get("direct") for r in res if r["step"] == "freeze" and r["info"].get("direct")}
    if direct:
        lines += ["", f"Fine-tuning at the real recipe's lr {REAL_LR:g}, 20 steps in {report['dtype']}, half the units "
                  "frozen: share of trainable entries that moved; distance of the result from the same run in "
                  "float32, in lengths of that run's update; float32 master weights used: "
                  + "; ".join(f"{k} {v['trainable_moved_frac']}, {v['dist_to_fp32_run']}, {v['master_weights']}"
                              for k, v in direct.items()) + "."]
    if report.get("warnings"):
        lines += ["", "## Warnings (not failures)", ""] + [f"- {w}" for w in report["warnings"]]
    fails = [r for r in res if not r["ok"]]
    if fails:
        lines += ["", "## Failures", ""]
        for r in fails:
            lines += [f"- {r['family']} / {r['step']}: `{(r['error'] or '')[:500]}`"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    ap.add_argument("--organism-prompts", type=int, default=32, help="prompts of the organism comparison (0: skip)")
    ap.add_argument("--min-agreement", type=float, default=0.85,
                    help="least organism verdict agreement with CPU float32 that passes")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the tiny models and the cache")
    ap.add_argument("--engines", default="ddp,fsdp",
                    help="multi-process engines to check with scripts/distributed_check.py ('' skips them)")
    args = ap.parse_args(argv)

    families = tuple(f for f in args.families.split(",") if f)
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; choose from {FAMILIES}")
    device = config.resolve_device(args.device)
    from ssah_utils.models import _as_dtype

    tdtype = _as_dtype(args.dtype)
    out = Path(args.out)
    t_all = time.perf_counter()
    ck = Checker(device)
    print(f"gpu_check: device {device}, dtype {args.dtype}, families {', '.join(families)}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="ssah_gpu_check_"))
    saved_cache = config.CACHE_DIR
    config.CACHE_DIR = tmp / "cache"  # stage results of this check never touch data/cache
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        from ssah_utils import world as _world

        config.seed_everything(0)
        world = _world.build_world(_world.WORLD_SEED)
        for fam in families:
            folder = tmp / "models" / fam
            try:
                save_tiny(fam, folder, world)
            except Exception as err:  # noqa: BLE001
                ck.results.append({"family": fam, "step": "load", "ok": False, "seconds": 0.0, "peak_mem_mb": None,
                                   "info": {}, "error": f"building the tiny model: {type(err).__name__}: {err}",
                                   "traceback": traceback.format_exc()})
                continue
            try:
                check_family(ck, fam, folder, device, args.dtype, tdtype, world)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            except Exception as err:  # noqa: BLE001 - steps catch their own; this is set-up outside them
                ck.results.append({"family": fam, "step": "setup", "ok": False, "seconds": 0.0, "peak_mem_mb": None,
                                   "info": {}, "error": f"{type(err).__name__}: {err}",
                                   "traceback": traceback.format_exc()})
        check_engines(ck, device, tuple(e for e in args.engines.split(",") if e))
        if args.organism_prompts > 0:
            check_organism(ck, device, args.dtype, tdtype, world, args.organism_prompts, args.min_agreement)
        hf_logging.set_verbosity(verbosity)
    finally:
        config.CACHE_DIR = saved_cache
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    n_ok = sum(r["ok"] for r in ck.results)
    warnings = []
    for r in ck.results:
        d = r["info"].get("direct", {}).get("dist_to_fp32_run") if r["step"] == "freeze" else None
        if d is not None and d > 0.5:
            warnings.append(f"{r['family']}: after 20 finetune steps at lr {REAL_LR:g} in {args.dtype} the weights lie "
                            f"{d:.2f} update-lengths from the float32 run's: updates are rounding away "
                            "(training.TrainConfig.master_weights='auto' should prevent this)")
    report = {"device": device, "dtype": args.dtype, "families": list(families), "argv": sys.argv if argv is None else argv,
              "passed": n_ok == len(ck.results) and bool(ck.results), "n_ok": n_ok, "n_steps": len(ck.results),
              "warnings": warnings,
              "seconds": round(time.perf_counter() - t_all, 1), "environment": environment(device),
              "results": ck.results, "tmp": str(tmp) if args.keep_tmp else None}
    write_report(out, report)
    for w in warnings:
        print(f"gpu_check: warning: {w}", flush=True)
    print(f"gpu_check: {n_ok}/{len(ck.results)} steps ok in {report['seconds']:.1f} s; report in {out}/gpu_check.md",
          flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
