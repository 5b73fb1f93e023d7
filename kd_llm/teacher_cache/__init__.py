"""Offline teacher: run a teacher once, store its top-k distribution per supervised token in compact shards, and
train from them with no teacher in memory.

* ``codec``: top-k extraction, delta-coded ids, quantised values, the tail's log-mass;
* ``writer``: atomic, resumable shard writing (:func:`write_teacher_cache`);
* ``reader``: :class:`TeacherCache`, verified against tokenizer, data and teacher, serving batches of targets;
* ``metadata``: ``metadata.json`` and the content fingerprints (teacher weights, tokenizer, dataset).

The loss on the stored targets is :mod:`kd_llm.losses.sparse`.
"""

from kd_llm.teacher_cache.codec import VALUE_CODECS
from kd_llm.teacher_cache.metadata import (
    CacheMetadata,
    TeacherCacheError,
    dataset_fingerprint,
    state_dict_sha256,
    tokenizer_sha256,
)
from kd_llm.teacher_cache.reader import TeacherCache
from kd_llm.teacher_cache.writer import TeacherCacheWriter, module_teacher_fn, write_teacher_cache

__all__ = ["VALUE_CODECS", "CacheMetadata", "TeacherCache", "TeacherCacheError", "TeacherCacheWriter",
           "dataset_fingerprint", "module_teacher_fn", "state_dict_sha256", "tokenizer_sha256",
           "write_teacher_cache"]
