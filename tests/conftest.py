"""Shared fixtures: tiny Llama models built from configs and a small date-arithmetic dataset (all offline, CPU)."""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def char_tokenizer():
    from kd_llm.models.char_tokenizer import build_char_tokenizer

    return build_char_tokenizer()


CHAR_VOCAB = 89  # len(build_char_tokenizer())


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer, 32-wide Llama with grouped-query attention (4 query heads, 2 KV heads), char-tokenizer ids."""
    values = dict(vocab_size=CHAR_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                              num_attention_heads=heads, num_key_value_heads=kv_heads,
                                              intermediate_size=2 * hidden))


@pytest.fixture
def make_tiny_llama():
    return tiny_llama


@pytest.fixture(scope="session")
def date_dataset(char_tokenizer):
    from kd_llm.data.sources import build_dataset, load_records

    return build_dataset(load_records("date_arithmetic", size=48, seed=1), char_tokenizer)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, char_tokenizer):
    """An untrained 48-wide tiny Llama teacher saved with the char tokenizer: a folder the scripts load by path."""
    folder = tmp_path_factory.mktemp("teacher")
    tiny_llama(len(char_tokenizer), hidden=48, seed=1).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def tiny_distillation_config(tmp_path, **overrides):
    """A 3-step CPU DistillationConfig (batch 8, lr 1e-2, alpha 0.5, T 2, logging every step), with overrides."""
    from kd_llm.training import DistillationConfig

    values = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                  alpha=0.5, temperature=2.0)
    values.update(overrides)
    return DistillationConfig(**values)


def teacher_watching_trainer(seen: dict, teacher_width: int):
    """A DistillationTrainer subclass that records in ``seen`` the ``teacher_model`` it is given and, at each training
    step, how many live modules are ``teacher_width`` wide: the teacher, if the training process still holds it, and
    whether the step's batch was packed (kd_llm.data.packing)."""
    import gc
    import warnings

    from kd_llm import DistillationTrainer

    class TeacherWatchingTrainer(DistillationTrainer):
        def __init__(self, *args, teacher_model=None, **kwargs):
            seen["teacher_model"] = teacher_model
            super().__init__(*args, teacher_model=teacher_model, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            seen["packed batches"] = "packed_example_ids" in inputs
            with warnings.catch_warnings():  # isinstance on deprecated torch aliases warns
                warnings.simplefilter("ignore")
                seen["teachers alive"] = sum(isinstance(o, torch.nn.Module) and hasattr(o, "config")
                                             and getattr(o.config, "hidden_size", None) == teacher_width
                                             for o in gc.get_objects())
            return super().training_step(model, inputs, *args, **kwargs)

    return TeacherWatchingTrainer


@pytest.fixture(scope="session")
def served_teacher(tiny_teacher_dir, tmp_path_factory):
    """scripts/serve_teacher.py serving ``tiny_teacher_dir`` on 127.0.0.1 (one process for the whole session)."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("httpx")
    from tests.helpers.served import ServerProcess

    server = ServerProcess(tiny_teacher_dir, tmp_path_factory.mktemp("served"))
    yield server
    server.stop()
