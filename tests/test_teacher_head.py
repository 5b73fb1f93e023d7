"""checked_teacher_head: the config check and the numerical probe together; a post-processing no config attribute
announces is caught by the probe."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from kd_llm.models.lm_head import TeacherHeadError, head_of_model
from kd_llm.training.teacher_head import checked_teacher_head
from tests.conftest import tiny_llama, tiny_llama_config


class ScaledLogitsLlama(LlamaForCausalLM):
    """A model that post-processes its logits without saying so in its config."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits * 0.5
        return outputs


def test_a_plain_model_passes_and_its_head_is_returned():
    model = tiny_llama(89, hidden=16)
    head = checked_teacher_head(model, vocab_size=89)
    assert head.sha256 == head_of_model(model).sha256
    with pytest.raises(TeacherHeadError, match="89 rows but its tokenizer 90"):
        checked_teacher_head(model, vocab_size=90)


def test_an_unannounced_logit_scaling_is_caught_by_the_probe():
    torch.manual_seed(0)
    model = ScaledLogitsLlama(tiny_llama_config(hidden_size=16, intermediate_size=32)).eval()
    head_of_model(model)  # the config says nothing ...
    with pytest.raises(TeacherHeadError, match="not soft_cap\\(lm_head\\(last hidden state\\)\\)"):
        checked_teacher_head(model)  # ... the numbers do
