"""Resident memory of precomputed teacher logits (``precompute_teacher_logits``): one ``[tokens, V]`` tensor (kd_llm
now) against one tensor per example (kd_llm before), on the demo's 9,000 date-arithmetic examples (char tokenizer,
V = 89) with a tiny 2-layer teacher.

Each layout is built in a fresh Python process, which reports ``VmRSS`` before and after the build and the bytes of
logits it keeps; the difference minus those bytes is the overhead.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precomputed_memory.py   # results/precomputed_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("per_example", "one_tensor")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(layout: str, examples: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd_llm.data.collator import CausalLMCollator
    from kd_llm.data.sources import build_dataset, load_records
    from kd_llm.models.char_tokenizer import build_char_tokenizer
    from kd_llm.training.targets import EXAMPLE_INDEX_COLUMN, PrecomputedTeacherLogits

    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    dataset = build_dataset(load_records("date_arithmetic", size=examples, seed=1), tokenizer)
    dataset = dataset.add_column(EXAMPLE_INDEX_COLUMN, list(range(len(dataset))))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                           pad_token_id=0)).eval()
    collator = CausalLMCollator(tokenizer.pad_token_id, passthrough_keys=(EXAMPLE_INDEX_COLUMN,))
    gc.collect()
    before = rss_bytes()
    if layout == "per_example":  # the layout kd_llm used before: a list of [positions, V] tensors
        with torch.no_grad():
            rows = [None] * len(dataset)
            lengths = dataset["length"]
            order = sorted(range(len(dataset)), key=lengths.__getitem__)
            for start in range(0, len(order), 8):
                batch = collator([dataset[i] for i in order[start:start + 8]])
                logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).logits[:, :-1]
                valid = batch["labels"][:, 1:] != -100
                for row, index in enumerate(batch[EXAMPLE_INDEX_COLUMN].tolist()):
                    rows[index] = logits[row][valid[row]].float().cpu()
        kept = sum(r.numel() * r.element_size() for r in rows)
    else:
        store = PrecomputedTeacherLogits.build(teacher, dataset, collator, batch_size=8, device="cpu",
                                               disable_progress=True)
        kept = store.nbytes
    gc.collect()
    after = rss_bytes()
    return {"layout": layout, "examples": examples, "logits_bytes": kept, "rss_growth_bytes": after - before,
            "overhead_bytes": after - before - kept}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=9000)
    parser.add_argument("--child", choices=LAYOUTS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "precomputed_memory_cpu.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.examples)))
        return
    results = []
    for layout in LAYOUTS:
        out = subprocess.run([sys.executable, __file__, "--child", layout, "--examples", str(args.examples)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        mib = {k: round(v / 2**20, 1) for k, v in results[-1].items() if k.endswith("bytes")}
        print(layout, mib)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
