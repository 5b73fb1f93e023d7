"""Distillation between a teacher and a student with different tokenizers.

* ``rendering``: one record through one model's tokenizer and chat template, with where each supervised token ends;
* ``alignment``: the two tokenizations cut at their common character boundaries into aligned spans;
* ``shared_vocab``: the tokens both vocabularies have (same surface string), for the hybrid loss;
* ``losses``: ULD, the shared-vocabulary hybrid and span (chain-rule) likelihood matching, per aligned span;
* ``objective``: alpha * the student's CE + (1 - alpha) * one of those losses, normalised like the same-tokenizer one.
* ``generated``: on-policy samples and seq_kd completions decoded and rendered again for both models, then aligned.
"""
