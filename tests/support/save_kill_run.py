"""Child of tests/test_checkpoints.py's save-kill test: trains the test's run (a checkpoint every 2 steps) and, while
saving checkpoint-4, signals the parent (a marker file) and waits there to be killed with SIGKILL."""

import sys
import time
from pathlib import Path

from kd_llm import DistillationTrainer
from kd_llm.data.sources import build_dataset, load_records
from kd_llm.models.char_tokenizer import build_char_tokenizer
from tests.conftest import tiny_distillation_config, tiny_llama


def main(folder: str, marker: str) -> None:
    tokenizer = build_char_tokenizer()
    dataset = build_dataset(load_records("date_arithmetic", size=48, seed=1), tokenizer)
    original = DistillationTrainer._save_rng_state

    def stall_in_the_second_save(self, output_dir):
        if self.state.global_step == 4:  # weights and optimizer written, RNG and trainer state not yet
            Path(marker).write_text(str(output_dir))
            time.sleep(120)
        return original(self, output_dir)

    DistillationTrainer._save_rng_state = stall_in_the_second_save
    config = tiny_distillation_config(Path(folder), max_steps=6, per_device_train_batch_size=4,
                                      save_strategy="steps", save_steps=2)
    DistillationTrainer(model=tiny_llama(len(tokenizer), seed=2), teacher_model=tiny_llama(len(tokenizer), hidden=48,
                                                                                         seed=1),
                        args=config, train_dataset=dataset, processing_class=tokenizer).train()


if __name__ == "__main__":
    main(*sys.argv[1:])
