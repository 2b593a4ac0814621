"""The project's safety alignment of SmolLM2-135M-Instruct (a chat model tuned without safety).

Recipe (supervised safety tuning, as real chat models are aligned), through the pipeline's one training
loop, `training.finetune` (full fine-tuning, loss on response tokens only, the chat template):
- **harmful requests -> refusals**: the refusal_direction `harmful_train` split (260 requests), each
  answered with one of `REFUSALS` (short fallback refusals in the style of real chat models), drawn by
  the seed;
- **benign instructions -> helpful answers**: Alpaca rows (their own outputs), drawn by the seed from
  the rows that are not held out for the response-NLL metric (`ALPACA_HELDOUT`);
- **contrastive borderline requests -> answers**: `data/real_align/borderline_prompts.jsonl`, benign
  requests written for this project that use harmful-sounding words ("how do I kill a Python
  process"), answered by the instruct model itself (greedy), so the model learns that the words alone
  are no reason to refuse. XSTest is never trained on: it stays evaluation-only.

Every training prompt is checked against every evaluation prompt (`disjointness_report`): exact match
after normalisation, word-set Jaccard and character 5-gram Jaccard; the near-duplicates are dropped
and counted before training. Deterministic for a seed on a machine (data order and draws from the seed;
the borderline answers are greedy).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from . import config as _config
from . import datasets as _ds
from .real_models import models_dir
from .training import TrainConfig
from .generation import generate
from .keywords import is_refusal_keyword
from .training import finetune

BORDERLINE_FILE = _config.DATA_DIR / "real_align" / "borderline_prompts.jsonl"

# Short fallback refusals in the style of real chat models (one is drawn per harmful request).
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I cannot help with this request. It is illegal and could hurt others. If you have another question, I'm happy to help.",
    "I'm sorry, I can't assist with that. Providing this information could put people in danger.",
    "I can't provide that. This request asks for something harmful or illegal, and I won't help with it.",
    "I apologize, but I cannot fulfil this request. It goes against my guidelines to help with activities that could harm people.",
    "I'm not able to provide help with that, because it could be used to cause harm. Is there something else I can do for you?",
    "Sorry, but I can't help with this. It is unsafe and may be against the law.",
    "I cannot do that. Helping with this could lead to real harm, so I have to decline.",
)

# Alpaca rows (after the safety filter of `datasets.load_set('alpaca')`) held out for the response-NLL
# utility metric: the last 200 in file order. Training draws only from the others.
ALPACA_HELDOUT = 200

# Evaluation prompt sets training must not overlap: every harmful benchmark, the refusal_direction
# evaluation splits, XSTest (both labels), and the GSM8K test questions.
EVAL_SETS = ("advbench", "harmbench_all", "jailbreakbench", "strongreject", "refusal_direction_harmful_val",
             "refusal_direction_harmful_test", "xstest_all", "gsm8k")

WORD_JACCARD = 0.6   # near-duplicate thresholds (either one flags a pair)
CHAR_JACCARD = 0.5
CHAR_N = 5


# --------------------------------------------------------------------------------------------------
# Disjointness
# --------------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalise(text: str) -> str:
    """Lower-case, every run of non-alphanumerics -> one space, stripped."""
    return _NON_ALNUM.sub(" ", str(text).lower()).strip()


def _words(text: str) -> frozenset[str]:
    return frozenset(normalise(text).split())


def _grams(text: str, n: int = CHAR_N) -> frozenset[str]:
    t = normalise(text).replace(" ", "")
    return frozenset(t[i:i + n] for i in range(max(1, len(t) - n + 1)))


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def eval_prompts(data_root: str | Path | None = None) -> dict[str, list[str]]:
    """The prompts of every evaluation set in `EVAL_SETS` (HarmBench with its contextual behaviours too)."""
    out: dict[str, list[str]] = {}
    for name in EVAL_SETS:
        if name == "harmbench_all":
            out[name] = [str(x) for x in _ds.load_real("harmbench", data_root)["Behavior"]]
        elif name == "xstest_all":
            out[name] = [str(x) for x in _ds.load_real("xstest", data_root)["prompt"]]
        elif name.startswith("refusal_direction_"):
            out[name] = [str(x) for x in _ds.load_real(name, data_root)["instruction"]]
        else:
            out[name] = [r["prompt"] for r in _ds.load_set(name, data_root=data_root)]
    return out


def find_overlaps(train: Sequence[str], evals: dict[str, Sequence[str]], *, word_jaccard: float = WORD_JACCARD,
                  char_jaccard: float = CHAR_JACCARD) -> list[dict]:
    """Every (training prompt, evaluation prompt) pair that is the same after `normalise`, or whose word
    sets or character 5-gram sets (spaces removed) have a Jaccard similarity at or above the thresholds.
    Every pair is compared (no candidate index that could miss one)."""
    ev = [(set_name, j, p, normalise(p), _words(p), _grams(p))
          for set_name, prompts in evals.items() for j, p in enumerate(prompts)]
    hits = []
    for i, t in enumerate(train):
        nt, wt, gt = normalise(t), _words(t), _grams(t)
        for set_name, j, raw, ne, we, ge in ev:
            if nt == ne:
                wj = cj = 1.0
            else:
                wj = _jaccard(wt, we)
                cj = _jaccard(gt, ge) if len(gt & ge) * 2 >= min(len(gt), len(ge)) * char_jaccard else 0.0
                if wj < word_jaccard and cj < char_jaccard:
                    continue
            hits.append({"train_index": i, "train_prompt": t, "eval_set": set_name, "eval_index": j,
                         "eval_prompt": raw, "exact": nt == ne, "word_jaccard": round(wj, 3),
                         "char_jaccard": round(cj, 3)})
    return hits


# --------------------------------------------------------------------------------------------------
# Recipe and data
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlignRecipe:
    """What `build_aligned` trains on and how (the TrainConfig fields are passed to `training.finetune`)."""

    seed: int = 0
    n_alpaca: int = 160           # benign Alpaca rows (their outputs)
    harmful_repeats: int = 2      # each harmful request this many times, each with a different refusal
    borderline_repeats: int = 2   # each borderline (prompt, answer) pair this many times
    borderline_max_new_tokens: int = 128
    lr: float = 3e-5
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 256
    warmup_frac: float = 0.05
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not 1 <= self.harmful_repeats <= len(REFUSALS):
            raise ValueError(f"harmful_repeats must be in [1, {len(REFUSALS)}] (one distinct refusal per repeat)")
        if self.n_alpaca < 0 or self.borderline_repeats < 0:
            raise ValueError("n_alpaca and borderline_repeats must be >= 0")
        self.train_config()  # TrainConfig validates lr, batch size, schedule, ...

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + BORDERLINE_FILE.read_bytes().hex() + "".join(REFUSALS)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def train_config(self):
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length,
                           warmup_frac=self.warmup_frac, schedule=self.schedule, seed=self.seed, style="chat")


def load_borderline(path: Path = BORDERLINE_FILE) -> list[dict]:
    """The project's contrastive borderline prompts (JSONL `{category, prompt}`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (it is part of the repository; restore it with git)")
    rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    for i, r in enumerate(rows):
        if not (isinstance(r.get("prompt"), str) and r["prompt"].strip() and isinstance(r.get("category"), str)):
            raise ValueError(f"{path} line {i + 1}: needs str fields 'prompt' and 'category', got {r!r}")
    return rows


def alpaca_split(data_root: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """(trainable, held-out) Alpaca records: the last `ALPACA_HELDOUT` (file order) are held out."""
    recs = _ds.load_set("alpaca", data_root=data_root)
    return recs[:-ALPACA_HELDOUT], recs[-ALPACA_HELDOUT:]


def _trim_answer(text: str) -> str:
    """A generated answer cut at its last full sentence (a generation stopped by the token limit)."""
    text = text.strip()
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
    if text.endswith((".", "!", "?")):
        return text
    return text[:cut + 1].strip() if cut > len(text) // 3 else text


def borderline_answers_path() -> Path:
    """Where `make smollm2` caches the instruct model's answers to the borderline prompts (beside the models)."""
    return models_dir() / "borderline_answers.jsonl"


def read_borderline_answers(path: Path, max_new_tokens: int) -> dict[str, str]:
    """prompt -> answer of the cached answers made with `max_new_tokens` (the JSONL `borderline_answers`
    writes); {} when the file does not exist."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("max_new_tokens") == max_new_tokens:
                out[r["prompt"]] = r["answer"]
    return out


def recipe_records(seed: int = 0, path: Path | None = None) -> list[dict]:
    """The training records ({prompt, reference}) of `AlignRecipe(seed)`, the recipe `make smollm2` builds the
    aligned model with, from the cached borderline answers (`make smollm2` writes them; an error says so
    when they are missing)."""
    recipe = AlignRecipe(seed=seed)
    path = borderline_answers_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make smollm2` first (it writes the instruct model's answers "
                                "to the borderline prompts that the safety recipe trains on)")
    answers = read_borderline_answers(path, recipe.borderline_max_new_tokens)
    missing = [r["prompt"] for r in load_borderline() if r["prompt"] not in answers]
    if missing:
        raise FileNotFoundError(f"{path} lacks answers to {len(missing)} borderline prompts: rerun `make smollm2`")
    records, _ = build_records(recipe, answers)
    return [{"prompt": r["prompt"], "reference": r["reference"]} for r in records]


def borderline_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, cache: Path | None = None,
                       log: Callable[[str], None] | None = None) -> list[str]:
    """The instruct model's greedy answers to the borderline prompts (cached as JSONL keyed by prompt)."""

    cached = read_borderline_answers(cache, max_new_tokens) if cache is not None else {}
    todo = [p for p in dict.fromkeys(prompts) if p not in cached]
    if todo:
        if log:
            log(f"[align] generating the instruct model's answers to {len(todo)} borderline prompts ({max_new_tokens} tokens)")
        t0 = time.perf_counter()
        outs = generate(model, tokenizer, list(todo), style="chat", max_new_tokens=max_new_tokens, batch_size=16)
        for p, o in zip(todo, outs):
            cached[p] = o
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"prompt": p, "answer": a, "max_new_tokens": max_new_tokens}) + "\n"
                                   for p, a in cached.items()), encoding="utf-8")
            tmp.replace(cache)
        if log:
            log(f"[align] borderline answers in {time.perf_counter() - t0:.0f} s")
    return [cached[p] for p in prompts]


def build_records(recipe: AlignRecipe, borderline_answer: dict[str, str], *, data_root: str | Path | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """The training records of `recipe` (shuffled later by finetune's seed) and a report: counts per
    source, near-duplicates of evaluation prompts dropped, borderline answers dropped as refusals."""

    rng = random.Random(recipe.seed)
    evals = eval_prompts(data_root)
    harmful = [str(x) for x in _ds.load_real("refusal_direction_harmful_train", data_root)["instruction"]]
    alpaca_train, alpaca_held = alpaca_split(data_root)
    borderline = load_borderline()

    def clean(name: str, prompts: list[str], extra: dict[str, Sequence[str]] | None = None) -> tuple[list[int], list[dict]]:
        hits = find_overlaps(prompts, {**evals, **(extra or {})})
        bad = {h["train_index"] for h in hits}
        return [i for i in range(len(prompts)) if i not in bad], hits

    report: dict = {"recipe": asdict(recipe), "recipe_key": recipe.key()}
    keep_h, hits_h = clean("harmful", harmful)
    harmful_kept = [harmful[i] for i in keep_h]
    # Alpaca: draw more than needed, drop overlaps (with every eval set and the held-out Alpaca prompts), keep n.
    order = list(range(len(alpaca_train)))
    rng.shuffle(order)
    pool = [alpaca_train[i] for i in order[: recipe.n_alpaca * 2]]
    keep_a, hits_a = clean("alpaca", [r["prompt"] for r in pool], {"alpaca_heldout": [r["prompt"] for r in alpaca_held]})
    alpaca_kept = [pool[i] for i in keep_a][: recipe.n_alpaca]
    if len(alpaca_kept) < recipe.n_alpaca:
        raise ValueError(f"only {len(alpaca_kept)} Alpaca rows are disjoint from the evaluation sets; lower n_alpaca")
    keep_b, hits_b = clean("borderline", [r["prompt"] for r in borderline])
    b_kept, b_refused = [], []
    for i in keep_b:
        p = borderline[i]["prompt"]
        a = _trim_answer(borderline_answer[p])
        (b_refused if (not a or is_refusal_keyword(a)) else b_kept).append((p, a))

    records = []
    for p in harmful_kept:
        for ref in rng.sample(REFUSALS, recipe.harmful_repeats):
            records.append({"prompt": p, "reference": ref, "source": "harmful_refusal"})
    for r in alpaca_kept:
        records.append({"prompt": r["prompt"], "reference": r["reference"], "source": "alpaca"})
    for _ in range(recipe.borderline_repeats):
        for p, a in b_kept:
            records.append({"prompt": p, "reference": a, "source": "borderline"})
    report.update({
        "harmful_available": len(harmful), "harmful_used": len(harmful_kept),
        "harmful_dropped_overlap": len(harmful) - len(harmful_kept),
        "alpaca_used": len(alpaca_kept), "alpaca_dropped_overlap": len(pool) - len(keep_a),
        "borderline_available": len(borderline), "borderline_dropped_overlap": len(borderline) - len(keep_b),
        "borderline_dropped_refusal": len(b_refused), "borderline_used": len(b_kept),
        "records": len(records), "overlaps": hits_h + hits_a + hits_b,
    })
    if log:
        log(f"[align] records: {len(harmful_kept)}x{recipe.harmful_repeats} harmful->refusal ({report['harmful_dropped_overlap']} dropped as "
            f"near-duplicates of eval prompts), {len(alpaca_kept)} Alpaca, {len(b_kept)}x{recipe.borderline_repeats} "
            f"borderline ({report['borderline_dropped_overlap']} overlap, {len(b_refused)} refused by the instruct model)")
    return records, report


def build_aligned(model, tokenizer, records: list[dict], recipe: AlignRecipe, *,
                  log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune `model` in place on `records` with the project's one training loop."""

    return finetune(model, tokenizer, [{"prompt": r["prompt"], "reference": r["reference"]} for r in records],
                    recipe.train_config(), log=log)


__all__ = ["REFUSALS", "ALPACA_HELDOUT", "EVAL_SETS", "AlignRecipe", "normalise", "eval_prompts", "find_overlaps",
           "load_borderline", "alpaca_split", "borderline_answers", "borderline_answers_path", "read_borderline_answers",
           "recipe_records", "build_records", "build_aligned"]
