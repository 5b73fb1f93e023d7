"""A small top-k teacher cache written from an in-process teacher."""

from kd_llm.data.collator import CausalLMCollator
from kd_llm.teacher_cache import module_teacher_fn, state_dict_sha256, tokenizer_sha256, write_teacher_cache


def build(path, teacher, dataset, tokenizer, *, teacher_fn=None, k=16, temperature=2.0, codec="float16",
          shard_size=20, batch_size=8):
    return write_teacher_cache(
        teacher_fn or module_teacher_fn(teacher), dataset, path, collator=CausalLMCollator(tokenizer.pad_token_id),
        teacher="tiny", teacher_hash=state_dict_sha256(teacher), tokenizer_hash=tokenizer_sha256(tokenizer),
        vocab_size=len(tokenizer), k=k, temperature=temperature, value_codec=codec, shard_size=shard_size,
        batch_size=batch_size, progress=False,
    )


def build_hidden(path, teacher, dataset, tokenizer, *, hidden_fn=None, dtype="float32", shard_size=20,
                 batch_size=8):
    """A hidden-state cache of ``teacher`` (a module) over ``dataset``."""
    from kd_llm.models.lm_head import head_of_model
    from kd_llm.teacher_cache.hidden_cache import module_hidden_fn, write_hidden_state_cache

    return write_hidden_state_cache(
        hidden_fn or module_hidden_fn(teacher), dataset, path, collator=CausalLMCollator(tokenizer.pad_token_id),
        head=head_of_model(teacher), teacher="tiny", teacher_hash=state_dict_sha256(teacher),
        tokenizer_hash=tokenizer_sha256(tokenizer), hidden_dtype=dtype, shard_size=shard_size,
        batch_size=batch_size, progress=False,
    )
