"""``scripts/distill_llm.py`` imported as a module, and the arguments that make it run in seconds on tiny models."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import distill_llm  # noqa: E402

# The tiny teacher is untrained, so the teacher check must be forced; the memory probe (subprocesses) is tested in
# tests/test_report_run.py.
# The demo's student keeps 3 of the teacher's layers and learns from 8,000 transfer prompts: 1 of the tiny teacher's 2,
# and no transfer set, here.
FAST = ["--student_num_layers", "1", "--transfer_size", "0",
        "--max_steps", "4", "--train_size", "16", "--eval_size", "10", "--max_new_tokens", "24",
        "--logging_steps", "2", "--disable_tqdm", "true", "--force", "true", "--measure_memory", "false"]

__all__ = ["FAST", "ROOT", "distill_llm"]
