"""Content-addressed, atomic caching of stage results.

A stage result is a dict of named parts. It is stored under
`<cache_dir>/<stage>/<key>/` where `key` hashes the stage's frozen config (its `asdict()`), the model
revision and `CACHE_FORMAT`. The config is written beside the parts, so a reader can see what made
them. A hit needs the exact same key and a complete entry; a write goes to a temporary folder that is
renamed into place only when every part is written, so an interrupted write leaves no entry behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import config as _config

CACHE_FORMAT = 1  # bump when the on-disk layout changes
_MANIFEST = "manifest.json"

# Which notebook computes the results of a stage, by stage-name prefix (the stage names passed to
# `cached` by stage_probe, stage_classify, stage_freeze and stage_budget). First match wins.
NOTEBOOK_OF_STAGE: tuple[tuple[str, str], ...] = (
    ("probe", "01_probe"),
    ("classify", "02_classify"),
    ("freeze", "03_freeze_finetune"),
    ("budget", "04_alignment_budget"),
)


class CacheMiss(LookupError):
    """A result is not in the cache while the cache is read-only (`read_only()`): nothing was computed."""

    def __init__(self, stage: str, key: str, notebook: str | None, cache_dir: Path):
        self.stage, self.key, self.notebook, self.cache_dir = stage, key, notebook, Path(cache_dir)
        run = (f"Run notebooks/{notebook}.ipynb first" if notebook else
               "Run the notebook that computes it first")
        super().__init__(
            f"No cached result for stage {stage!r} (key {key}) in {self.cache_dir}, and the cache is read-only "
            f"here, so nothing is computed. {run} with the same preset, model and seed (or `make reproduce` "
            "to run every notebook), then rerun this cell. Keys include the model's weights and the prompt "
            "sets' content, so a rebuilt model or world misses too."
        )


_STATE = threading.local()  # `read_only` nesting: `stack` holds one notebook hint (or None) per open block


def notebook_for_stage(stage: str) -> str | None:
    """The notebook whose run caches `stage` (by `NOTEBOOK_OF_STAGE` prefix), or None if unknown."""
    return next((nb for prefix, nb in NOTEBOOK_OF_STAGE if stage.startswith(prefix)), None)


def is_read_only() -> bool:
    """Whether `cached()` may only read (inside a `read_only()` block of this thread)."""
    return bool(getattr(_STATE, "stack", None))


@contextlib.contextmanager
def read_only(notebook: str | None = None) -> Iterator[None]:
    """Within the block, `cached()` returns hits as usual and raises `CacheMiss` on a miss instead of
    computing (05_figures: figures from cached results only, in seconds).

    `notebook` names the notebook to run on a miss (e.g. "03_freeze_finetune", which also computes the
    02_classify labels it uses); None keeps the enclosing block's, else the stage's own notebook
    (`notebook_for_stage`). Blocks nest; the previous state is restored on exit, also on an error.
    """
    stack = getattr(_STATE, "stack", None)
    if stack is None:
        stack = _STATE.stack = []
    stack.append(notebook)
    try:
        yield
    finally:
        stack.pop()


def _jsonable(obj: Any) -> Any:
    """A JSON-stable form of a config value (dataclasses, tuples, paths, sets)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cache keys must be built from plain values; got {type(obj).__name__}. "
        "Put only literals, tuples and nested frozen dataclasses in a stage config."
    )


def config_key(stage: str, config: Any, model_revision: str = "") -> str:
    """The hex key of a (stage, config, model revision): equal keys mean identical inputs."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    payload = json.dumps(
        {"stage": stage, "config": _jsonable(config), "model_revision": model_revision, "format": CACHE_FORMAT},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _write_part(folder: Path, name: str, value: Any) -> dict:
    if isinstance(value, pd.DataFrame):
        value.to_parquet(folder / f"{name}.parquet")
        return {"name": name, "kind": "dataframe", "file": f"{name}.parquet"}
    if isinstance(value, torch.Tensor):
        save_file({"tensor": value.detach().cpu().contiguous()}, str(folder / f"{name}.safetensors"))
        return {"name": name, "kind": "tensor", "file": f"{name}.safetensors"}
    try:
        text = json.dumps(value, allow_nan=True)
    except TypeError:
        torch.save(value, folder / f"{name}.pt")
        return {"name": name, "kind": "pickle", "file": f"{name}.pt"}
    (folder / f"{name}.json").write_text(text)
    return {"name": name, "kind": "json", "file": f"{name}.json"}


def _read_part(folder: Path, entry: dict) -> Any:
    path = folder / entry["file"]
    kind = entry["kind"]
    if kind == "dataframe":
        return pd.read_parquet(path)
    if kind == "tensor":
        return load_file(str(path))["tensor"]
    if kind == "json":
        return json.loads(path.read_text())
    return torch.load(path, weights_only=False)


def cache_path(stage: str, config: Any, model_revision: str = "", cache_dir: Path | None = None) -> Path:
    """Where the entry of this (stage, config, revision) lives, whether or not it exists yet."""
    root = Path(cache_dir) if cache_dir is not None else _config.CACHE_DIR
    return root / stage / config_key(stage, config, model_revision)


def load_cached(stage: str, config: Any, model_revision: str = "", cache_dir: Path | None = None) -> dict | None:
    """The cached result, or None when no complete entry matches exactly."""
    folder = cache_path(stage, config, model_revision, cache_dir)
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return None
    meta = json.loads(manifest.read_text())
    return {e["name"]: _read_part(folder, e) for e in meta["parts"]}


def cached(
    stage: str,
    config: Any,
    compute: Callable[[], dict],
    *,
    model_revision: str = "",
    cache_dir: Path | None = None,
    refresh: bool = False,
    verbose: bool = True,
) -> dict:
    """Return `compute()`'s result for this config, from the cache when an identical entry exists.

    `compute` must return a dict of named parts (DataFrame, Tensor, JSON-able value or picklable
    object). `refresh=True` recomputes and overwrites the entry. Inside `read_only()` a miss raises
    `CacheMiss` and `compute` is never called.
    """
    if not stage or "/" in stage or stage.startswith("."):
        raise ValueError(f"stage must be a plain name like 'classify', got {stage!r}")
    folder = cache_path(stage, config, model_revision, cache_dir)
    if refresh and is_read_only():
        raise ValueError(f"refresh=True recomputes stage {stage!r}, but the cache is read-only here (cache.read_only)")
    if not refresh:
        hit = load_cached(stage, config, model_revision, cache_dir)
        if hit is not None:
            if verbose:
                print(f"[cache] {stage}: hit {folder.name}")
            return hit
    if is_read_only():
        hint = next((nb for nb in reversed(_STATE.stack) if nb), None)  # the innermost block that names one
        raise CacheMiss(stage, folder.name, hint or notebook_for_stage(stage), folder.parent.parent)
    t0 = time.perf_counter()
    result = compute()
    seconds = time.perf_counter() - t0
    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise TypeError(f"compute() for stage {stage!r} must return a dict with str keys, got {type(result).__name__}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        parts = [_write_part(tmp, name, value) for name, value in result.items()]
        (tmp / "config.json").write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True))
        meta = {
            "stage": stage,
            "key": folder.name,
            "model_revision": model_revision,
            "format": CACHE_FORMAT,
            "compute_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "env": _config.env_report(),
            "parts": parts,
        }
        # The manifest is written last: an entry without it is incomplete and never read.
        (tmp / _MANIFEST).write_text(json.dumps(meta, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"[cache] {stage}: computed in {seconds:.1f} s, stored {folder.name}")
    return result


def cache_metadata(stage: str, config: Any, model_revision: str = "", cache_dir: Path | None = None) -> dict | None:
    """The manifest (timings, env report, parts) of a cached entry, or None."""
    manifest = cache_path(stage, config, model_revision, cache_dir) / _MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None
