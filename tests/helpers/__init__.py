"""Helpers shared by several test modules (test modules never import from each other).

- :mod:`tests.helpers.training`: parameter snapshots and their largest difference.
- :mod:`tests.helpers.fused`: inputs and checks for the fused objective against the dense one on materialised logits.
- :mod:`tests.helpers.cache`: building a small top-k teacher cache.
- :mod:`tests.helpers.launch`: ``accelerate launch`` of the runner scripts in :mod:`tests.support`.
- :mod:`tests.helpers.scripts`: ``scripts/distill_llm.py`` imported, and the arguments that make it fast.

Tiny models, configs and fixtures stay in ``tests/conftest.py``.
"""
