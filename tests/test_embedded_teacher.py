"""The specialist teacher that ships inside kd_llm: loadable offline, small, and actually skilled."""

from pathlib import Path

from kd_llm.evaluation.skills import evaluate_skill
from kd_llm.models.char_tokenizer import build_char_tokenizer
from kd_llm.models.loading import embedded_model_dir, load_model, load_tokenizer


def test_embedded_teacher_is_small_safetensors_with_the_char_tokenizer():
    folder = embedded_model_dir("date-teacher")
    weights = Path(folder) / "model.safetensors"
    assert weights.stat().st_size <= 10 * 1024**2
    assert not list(Path(folder).glob("*.bin"))
    tokenizer = load_tokenizer("embedded:date-teacher")
    assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
    assert tokenizer.chat_template


def test_embedded_teacher_answers_held_out_problems():
    model = load_model("embedded:date-teacher")
    tokenizer = load_tokenizer("embedded:date-teacher")
    # 100 eval-split problems with another seed than the card's 1,000, 20 per category.
    scores = evaluate_skill(model, tokenizer, size=100, seed=7)
    assert scores["mean_category_exact_match"] >= 0.9
    assert min(scores["per_category"].values()) >= 0.7
