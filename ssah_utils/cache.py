"""Content-addressed, atomic, checksummed caching of stage results; no pickle.

A stage result is a dict of named parts. It is stored under `<cache_dir>/<stage>/<key>/` where `key`
hashes the stage's frozen config (its `asdict()`), the model revision, the stage's **code version**
(`code_version`: a hash of the source of the module that computes it and of every `ssah_utils` module
it imports, docstrings and comments left out) and `CACHE_FORMAT`, so an edited stage never meets the
results of its old code. The config is written beside the parts, so a reader can see what made them.

Parts are stored as data only: a DataFrame as parquet, a tensor as safetensors, a JSON-able value as
JSON, and anything else (dicts of tensors, dataclasses of `ssah_utils`, tuples, numpy arrays) as a
tagged JSON tree whose tensors and tables sit in safetensors and parquet files. Nothing is ever
unpickled, so a planted file cannot run code. The manifest records the SHA-256 of every file; a read
verifies them, and an entry that is corrupt, edited or partial is reported with its path and
recomputed (inside `read_only()` it raises `CacheCorrupt`, a `CacheMiss`, naming the path).
`python -m ssah_utils.cache verify [--drop]` checks (and drops) every entry of a cache.

A hit needs the exact same key and a complete, verified entry; a write goes to a temporary folder
that is renamed into place only when every part is written, so an interrupted write leaves no entry.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import config as _config
from .distributed import is_main_process

CACHE_FORMAT = 2  # bump when the on-disk layout changes (2: no pickle, checksums, code version in the key)
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


class CacheCorrupt(CacheMiss):
    """A cached entry failed verification (a checksum, a missing or unreadable part) while the cache is
    read-only, so it cannot be recomputed here."""

    def __init__(self, stage: str, key: str, notebook: str | None, cache_dir: Path, path: Path, reason: str):
        super().__init__(stage, key, notebook, cache_dir)
        self.path, self.reason = Path(path), reason
        self.args = (f"The cached entry {path} of stage {stage!r} is corrupt ({reason}); it is not used. "
                     f"Delete it (or run `python -m ssah_utils.cache verify --drop`) and run notebooks/"
                     f"{notebook or '<the notebook of this stage>'}.ipynb to recompute it.",)

    def __str__(self) -> str:
        return self.args[0]


class CorruptEntry(Exception):
    """Raised by `load_cached(..., strict=True)` for an entry that exists but fails verification."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


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


def config_key(stage: str, config: Any, model_revision: str = "", code: str = "") -> str:
    """The hex key of a (stage, config, model revision, code version): equal keys mean identical inputs."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    body = {"stage": stage, "config": _jsonable(config), "model_revision": model_revision, "format": CACHE_FORMAT}
    if code:
        body["code"] = code
    payload = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# Code version: what a stage's results were computed with
# --------------------------------------------------------------------------------------------------

_PACKAGE = __name__.rsplit(".", 1)[0]  # "ssah_utils"
# Modules that never shape a cached result: this cache (its layout is CACHE_FORMAT), figure and table
# writing, the paper's reported numbers, the stages' reports (their figures) and 05's redrawing.
CODE_EXCLUDED = frozenset({"cache", "plots", "paper", "stage_figures", "report", "report_probe", "report_classify",
                           "report_freeze", "report_budget"})
_CODE_MEMO: dict[str, str] = {}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _package_imports(tree: ast.AST, module: str) -> set[str]:
    """Short names of the package modules that `module`'s source imports (anywhere, late imports too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1 and not node.module:
                out.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == _PACKAGE:
                parts = node.module.split(".")
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == _PACKAGE and len(parts) > 1:
                    out.add(parts[1])
    return out


def code_version(module: str, pkg_dir: Path | None = None) -> str:
    """A hash of the code that computes a result made in `module` (e.g. 'ssah_utils.stage_budget'): the
    module's source and that of every `ssah_utils` module it imports, transitively, without docstrings
    and comments (`CODE_EXCLUDED` are left out). A module outside the package hashes its own source;
    one without a source file gives ''. `pkg_dir` reads the package's sources from another folder (tests)."""
    memo = f"{module}@{pkg_dir or ''}"
    if memo in _CODE_MEMO:
        return _CODE_MEMO[memo]
    pkg_dir = Path(pkg_dir) if pkg_dir is not None else Path(__file__).resolve().parent
    if module.startswith(_PACKAGE + "."):
        todo, seen, h = [module.split(".")[1]], set(), hashlib.sha256()
        while todo:
            name = todo.pop()
            path = pkg_dir / f"{name}.py"
            if name in seen or name in CODE_EXCLUDED or not path.is_file():
                continue
            seen.add(name)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            todo.extend(sorted(_package_imports(tree, name) - seen))
        for name in sorted(seen):
            tree = _strip_docstrings(ast.parse((pkg_dir / f"{name}.py").read_text(encoding="utf-8")))
            h.update(f"{name}\0{ast.dump(tree)}\0".encode())
        version = h.hexdigest()[:16]
    else:
        mod = sys.modules.get(module)
        path = getattr(mod, "__file__", None)
        version = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path and Path(path).is_file() else ""
    _CODE_MEMO[memo] = version
    return version


def _code_of(compute: Callable) -> str:
    fn = getattr(compute, "func", compute)  # functools.partial
    module = getattr(fn, "__module__", None) or ""
    return code_version(module) if module.startswith(_PACKAGE + ".") else ""


# --------------------------------------------------------------------------------------------------
# Parts: data-only encodings (no pickle) and checksums
# --------------------------------------------------------------------------------------------------

class _Tree:
    """Collects the tensors and tables of one part while it is encoded as tagged JSON."""

    def __init__(self, stage: str, name: str):
        self.stage, self.name = stage, name
        self.tensors: dict[str, torch.Tensor] = {}
        self.frames: list[pd.DataFrame] = []

    def tensor(self, t: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t.detach().cpu().contiguous()
        return key

    def frame(self, df: pd.DataFrame) -> int:
        self.frames.append(df)
        return len(self.frames) - 1

    def refuse(self, value: Any) -> TypeError:
        return TypeError(
            f"cache part {self.name!r} of stage {self.stage!r} holds a {type(value).__module__}.{type(value).__name__}, "
            "which the cache cannot store as data (no pickle). Return DataFrames, tensors, numpy arrays, numbers, "
            "strings, lists/tuples/dicts of them or dataclasses of ssah_utils.")


_TAGS = ("__tuple__", "__dict__", "__set__", "__frozenset__", "__tensor__", "__ndarray__", "__dataframe__",
         "__series__", "__float__", "__np__", "__dataclass__", "__path__")


def _enc(v: Any, tree: _Tree) -> Any:
    if v is None or isinstance(v, (bool, str)) or type(v) is int:
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(v, np.generic):
        item = v.item()
        if not isinstance(item, (bool, int, float, str)):
            raise tree.refuse(v)
        return {"__np__": v.dtype.str, "v": _enc(item, tree)}
    if isinstance(v, torch.Tensor):
        return {"__tensor__": tree.tensor(v)}
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biuf":
            raise tree.refuse(v)
        return {"__ndarray__": tree.tensor(torch.from_numpy(np.ascontiguousarray(v).copy())), "dtype": v.dtype.str}
    if isinstance(v, pd.DataFrame):
        return {"__dataframe__": tree.frame(v)}
    if isinstance(v, pd.Series):
        return {"__series__": tree.frame(v.to_frame(name="values")), "name": _enc(v.name, tree)}
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return {"__tuple__": [_enc(x, tree) for x in v]}
    if isinstance(v, list):
        return [_enc(x, tree) for x in v]
    if isinstance(v, (set, frozenset)):
        tag = "__frozenset__" if isinstance(v, frozenset) else "__set__"
        return {tag: [_enc(x, tree) for x in sorted(v, key=repr)]}
    if isinstance(v, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in v):
            return {k: _enc(x, tree) for k, x in v.items()}
        return {"__dict__": [[_enc(k, tree), _enc(x, tree)] for k, x in v.items()]}
    if isinstance(v, Path):
        return {"__path__": str(v)}
    if dataclasses.is_dataclass(v) and not isinstance(v, type) and type(v).__module__.startswith(_PACKAGE + "."):
        cls = type(v)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _enc(getattr(v, f.name), tree) for f in dataclasses.fields(v)}}
    raise tree.refuse(v)


def _dec(v: Any, tensors: dict, frames: list) -> Any:
    if isinstance(v, list):
        return [_dec(x, tensors, frames) for x in v]
    if not isinstance(v, dict):
        return v
    tag = next((t for t in _TAGS if t in v), None)
    if tag is None:
        return {k: _dec(x, tensors, frames) for k, x in v.items()}
    if tag == "__tuple__":
        return tuple(_dec(x, tensors, frames) for x in v[tag])
    if tag == "__dict__":
        return {_dec(k, tensors, frames): _dec(x, tensors, frames) for k, x in v[tag]}
    if tag in ("__set__", "__frozenset__"):
        items = [_dec(x, tensors, frames) for x in v[tag]]
        return set(items) if tag == "__set__" else frozenset(items)
    if tag == "__tensor__":
        return tensors[v[tag]]
    if tag == "__ndarray__":
        return tensors[v[tag]].numpy().astype(np.dtype(v["dtype"]), copy=False)
    if tag == "__dataframe__":
        return frames[v[tag]]
    if tag == "__series__":
        return frames[v[tag]]["values"].rename(_dec(v["name"], tensors, frames))
    if tag == "__float__":
        return float(v[tag])
    if tag == "__np__":
        return np.dtype(v["__np__"]).type(_dec(v["v"], tensors, frames))
    if tag == "__path__":
        return Path(v[tag])
    # a dataclass of this package: only ssah_utils classes are ever looked up, and only dataclasses built
    mod_name, _, qual = v[tag].partition(":")
    if not mod_name.startswith(_PACKAGE + "."):
        raise ValueError(f"refusing to rebuild {v[tag]!r}: only dataclasses of {_PACKAGE} are stored")
    cls: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"refusing to rebuild {v[tag]!r}: not a dataclass")
    obj = cls.__new__(cls)
    for k, x in v["fields"].items():
        object.__setattr__(obj, k, _dec(x, tensors, frames))
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():  # safetensors refuses tensors sharing memory: copy the repeats only
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        out[k] = t.clone() if ptr in seen and ptr != -1 else t
        seen.add(ptr)
    save_file(out, str(path))


def _write_part(folder: Path, stage: str, name: str, value: Any) -> dict:
    """Write one part as data files; the manifest entry lists each file with its SHA-256."""
    if isinstance(value, pd.DataFrame):
        value.to_parquet(folder / f"{name}.parquet")
        entry = {"name": name, "kind": "dataframe", "file": f"{name}.parquet"}
    elif isinstance(value, torch.Tensor):
        save_file({"tensor": value.detach().cpu().contiguous()}, str(folder / f"{name}.safetensors"))
        entry = {"name": name, "kind": "tensor", "file": f"{name}.safetensors"}
    else:
        try:
            text = json.dumps(value, allow_nan=True)
            kind = "json"
        except TypeError:
            tree = _Tree(stage, name)
            text = json.dumps(_enc(value, tree), allow_nan=True)
            kind = "tree"
        (folder / f"{name}.json").write_text(text)
        entry = {"name": name, "kind": kind, "file": f"{name}.json"}
        if kind == "tree":
            files = []
            if tree.tensors:
                _save_tensors(tree.tensors, folder / f"{name}.tensors.safetensors")
                files.append(f"{name}.tensors.safetensors")
            for i, df in enumerate(tree.frames):
                df.to_parquet(folder / f"{name}.df{i}.parquet")
                files.append(f"{name}.df{i}.parquet")
            entry["extra"] = files
    files = [entry["file"], *entry.get("extra", [])]
    entry["sha256"] = {f: _sha256(folder / f) for f in files}
    return entry


def _read_part(folder: Path, entry: dict) -> Any:
    """Read one part after checking every file against the manifest's SHA-256 (`CorruptEntry` if not)."""
    sums = entry.get("sha256")
    if not isinstance(sums, dict) or entry.get("file") not in sums:
        raise CorruptEntry(folder, f"part {entry.get('name')!r} has no checksum in the manifest")
    for f, want in sums.items():
        path = folder / f
        if Path(f).name != f or not path.is_file():
            raise CorruptEntry(folder, f"part file {f} is missing")
        got = _sha256(path)
        if got != want:
            raise CorruptEntry(folder, f"{f} has SHA-256 {got[:16]}..., the manifest says {want[:16]}... (edited or damaged)")
    path = folder / entry["file"]
    kind = entry["kind"]
    try:
        if kind == "dataframe":
            return pd.read_parquet(path)
        if kind == "tensor":
            return load_file(str(path))["tensor"]
        if kind == "json":
            return json.loads(path.read_text())
        if kind == "tree":
            extra = entry.get("extra", [])
            tensors = next((load_file(str(folder / f)) for f in extra if f.endswith(".safetensors")), {})
            frames = [pd.read_parquet(folder / f) for f in extra if f.endswith(".parquet")]
            return _dec(json.loads(path.read_text()), tensors, frames)
    except CorruptEntry:
        raise
    except Exception as err:  # a checksummed file that still does not parse
        raise CorruptEntry(folder, f"{entry['file']} cannot be read ({type(err).__name__}: {err})") from err
    raise CorruptEntry(folder, f"part {entry.get('name')!r} has unknown kind {kind!r} (pickle parts are never read)")


def cache_path(stage: str, config: Any, model_revision: str = "", cache_dir: Path | None = None,
               code: str = "") -> Path:
    """Where the entry of this (stage, config, revision, code version) lives, whether or not it exists yet."""
    root = Path(cache_dir) if cache_dir is not None else _config.CACHE_DIR
    return root / stage / config_key(stage, config, model_revision, code)


def _load_entry(folder: Path, stage: str) -> dict | None:
    """The verified parts of the entry in `folder`; None when there is no entry; `CorruptEntry` when the
    folder exists but fails verification (no manifest: a partial entry; a bad checksum or part)."""
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        if folder.is_dir():
            raise CorruptEntry(folder, f"no {_MANIFEST}: a partial entry (its files are never read)")
        return None
    try:
        meta = json.loads(manifest.read_text())
        parts = meta["parts"]
        ok = (meta.get("stage") == stage and meta.get("key") == folder.name and meta.get("format") == CACHE_FORMAT
              and isinstance(parts, list))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptEntry(folder, f"{_MANIFEST} cannot be read ({type(err).__name__}: {err})") from err
    if not ok:
        raise CorruptEntry(folder, f"{_MANIFEST} does not describe stage {stage!r}, key {folder.name}, format {CACHE_FORMAT}")
    return {e["name"]: _read_part(folder, e) for e in parts}


def load_cached(stage: str, config: Any, model_revision: str = "", cache_dir: Path | None = None, *,
                code: str = "", strict: bool = False) -> dict | None:
    """The cached, verified result, or None when no complete entry matches exactly. A corrupt entry is
    None too (it is reported by `cached`), or raises `CorruptEntry` with `strict=True`."""
    folder = cache_path(stage, config, model_revision, cache_dir, code)
    try:
        return _load_entry(folder, stage)
    except CorruptEntry:
        if strict:
            raise
        return None


def cached(
    stage: str,
    config: Any,
    compute: Callable[[], dict],
    *,
    model_revision: str = "",
    cache_dir: Path | None = None,
    refresh: bool = False,
    verbose: bool = True,
    code: str | None = None,
) -> dict:
    """Return `compute()`'s result for this config, from the cache when an identical, verified entry exists.

    `compute` must return a dict of named parts (DataFrame, Tensor, JSON-able value, or a tree of those,
    numpy arrays and ssah_utils dataclasses). `code` is the code version in the key; None = the version
    of the module that defines `compute` when it is a module of this package (`code_version`), else ''.
    `refresh=True` recomputes and overwrites the entry. A corrupt entry is reported (with its path) and
    recomputed. On a process of a distributed group other than rank 0 nothing is written (`is_main_process`:
    one writer, and a follower's results may be partial, only rank 0 evaluates; the cache folder is the
    group's shared disk).
    Inside `read_only()` a miss raises `CacheMiss` (a corrupt entry `CacheCorrupt`) and
    `compute` is never called.
    """
    if not stage or "/" in stage or stage.startswith("."):
        raise ValueError(f"stage must be a plain name like 'classify', got {stage!r}")
    code = _code_of(compute) if code is None else code
    folder = cache_path(stage, config, model_revision, cache_dir, code)
    if refresh and is_read_only():
        raise ValueError(f"refresh=True recomputes stage {stage!r}, but the cache is read-only here (cache.read_only)")
    corrupt: CorruptEntry | None = None
    if not refresh:
        try:
            hit = _load_entry(folder, stage)
        except CorruptEntry as err:
            hit, corrupt = None, err
        if hit is not None:
            if verbose:
                print(f"[cache] {stage}: hit {folder.name}")
            return hit
    if is_read_only():
        hint = next((nb for nb in reversed(_STATE.stack) if nb), None)  # the innermost block that names one
        notebook = hint or notebook_for_stage(stage)
        if corrupt is not None:
            raise CacheCorrupt(stage, folder.name, notebook, folder.parent.parent, folder, corrupt.reason)
        raise CacheMiss(stage, folder.name, notebook, folder.parent.parent)
    if corrupt is not None:
        print(f"[cache] {stage}: entry {folder} is corrupt ({corrupt.reason}); recomputing it", flush=True)
    t0 = time.perf_counter()
    result = compute()
    seconds = time.perf_counter() - t0
    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise TypeError(f"compute() for stage {stage!r} must return a dict with str keys, got {type(result).__name__}")
    if not is_main_process():  # rank 0 of the process group writes the entry; the others only took their part in it
        return result
    bad = [k for k in result if not k or Path(k).name != k or k.startswith(".") or k in ("config", "manifest")]
    if bad:
        raise ValueError(f"compute() for stage {stage!r} returned part names {bad} that are not plain file names")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        parts = [_write_part(tmp, stage, name, value) for name, value in result.items()]
        (tmp / "config.json").write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True))
        meta = {
            "stage": stage,
            "key": folder.name,
            "model_revision": model_revision,
            "code_version": code,
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


def cache_metadata(stage: str, config: Any, model_revision: str = "", cache_dir: Path | None = None,
                   code: str = "") -> dict | None:
    """The manifest (timings, env report, parts, code version) of a cached entry, or None."""
    manifest = cache_path(stage, config, model_revision, cache_dir, code) / _MANIFEST
    try:
        return json.loads(manifest.read_text()) if manifest.is_file() else None
    except ValueError:
        return None


def verify(cache_dir: Path | None = None, drop: bool = False) -> list[tuple[Path, str]]:
    """Check every entry under `cache_dir` (default: the project cache); return (path, reason) for each
    that fails (and, with `drop`, delete it): corrupt or partial entries and left-over temporary folders."""
    root = Path(cache_dir) if cache_dir is not None else _config.CACHE_DIR
    bad = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for entry in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            if entry.name.startswith("."):  # a write in progress (or one killed mid-way): its temporary folder
                bad.append((entry, "temporary folder of an unfinished write"))
                continue
            try:
                _load_entry(entry, stage_dir.name)
            except CorruptEntry as err:
                bad.append((entry, err.reason))
    if drop:
        for path, _ in bad:
            shutil.rmtree(path, ignore_errors=True)
    return bad


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ssah_utils.cache", description="Check the stage cache.")
    ap.add_argument("command", choices=["verify"])
    ap.add_argument("--cache-dir", default=None, help="default: $SSAH_CACHE_DIR or data/cache")
    ap.add_argument("--drop", action="store_true", help="delete every entry that fails (it is recomputed on next use)")
    args = ap.parse_args()
    failures = verify(args.cache_dir, drop=args.drop)
    for path, reason in failures:
        print(f"{'dropped' if args.drop else 'corrupt'}: {path}: {reason}")
    print(f"{len(failures)} bad entr{'y' if len(failures) == 1 else 'ies'}")
    sys.exit(1 if failures and not args.drop else 0)
