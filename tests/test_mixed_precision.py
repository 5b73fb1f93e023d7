"""Mixed precision through Accelerate on CPU: bf16 autocasts both models' forward passes while every loss term stays
float32 and finite, on the dense and the fused loss path; fp16 (which Accelerate cannot autocast on CPU) is refused."""

import pytest
import torch

from kd_llm import DistillationTrainer
from tests.conftest import tiny_llama
from tests.conftest import tiny_distillation_config as make_config


class TermRecordingTrainer(DistillationTrainer):
    """Keeps every micro-batch's loss terms as the trainer computed them (before logging reduces them)."""

    def _record(self, terms, loss, temperature, scale):
        self.recorded_terms = getattr(self, "recorded_terms", [])
        self.recorded_terms.append({"total": terms.total.detach(), "ce": terms.ce.detach(), "kd": terms.kd.detach(),
                                    "loss": loss.detach()})
        super()._record(terms, loss, temperature, scale)


def record_matmul_dtypes(model, sink: list):
    """The output dtype of the first decoder layer's MLP projection: bfloat16 exactly when autocast is on."""
    return model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: sink.append(out.dtype))


def train_recording(tmp_path, tokenizer, dataset, **overrides):
    teacher = tiny_llama(len(tokenizer), hidden=48, seed=1)
    student = tiny_llama(len(tokenizer), seed=2)
    student_dtypes, teacher_dtypes = [], []
    record_matmul_dtypes(student, student_dtypes)
    record_matmul_dtypes(teacher, teacher_dtypes)
    trainer = TermRecordingTrainer(model=student, teacher_model=teacher,
                                   args=make_config(tmp_path, max_steps=2, **overrides),
                                   train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer, student_dtypes, teacher_dtypes


@pytest.mark.parametrize("fused_loss", ["false", "true"])
def test_bf16_autocasts_the_models_and_keeps_every_loss_term_float32(tmp_path, char_tokenizer, date_dataset,
                                                                     fused_loss):
    trainer, student_dtypes, teacher_dtypes = train_recording(tmp_path / "bf16", char_tokenizer, date_dataset,
                                                              bf16=True, fused_loss=fused_loss)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp
    assert bool(trainer.fused_loss) == (fused_loss == "true")
    # The training forward passes ran under bf16 autocast (the probe of the fused path may add float32 entries).
    assert torch.bfloat16 in student_dtypes and torch.bfloat16 in teacher_dtypes
    assert len(trainer.recorded_terms) == 2
    for terms in trainer.recorded_terms:
        for name, value in terms.items():
            assert value.dtype == torch.float32, name
            assert torch.isfinite(value), name
        assert terms["kd"] > 0 and terms["ce"] > 0

    reference, student_dtypes, _ = train_recording(tmp_path / "fp32", char_tokenizer, date_dataset,
                                                   fused_loss=fused_loss)
    assert torch.bfloat16 not in student_dtypes
    # bf16 matmuls move the first step's loss by rounding only.
    assert trainer.recorded_terms[0]["total"].item() == pytest.approx(reference.recorded_terms[0]["total"].item(),
                                                                      rel=2e-2)


def test_fp16_on_cpu_is_refused_before_training(tmp_path, char_tokenizer, date_dataset):
    # Accelerate has no fp16 autocast on CPU and would silently train in float32.
    with pytest.raises(ValueError, match="fp16 mixed precision was requested.*float32 on cpu.*bf16=True"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                            teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
                            args=make_config(tmp_path, fp16=True), train_dataset=date_dataset,
                            processing_class=char_tokenizer)
