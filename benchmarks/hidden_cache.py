"""Hidden-state teacher cache: bytes per supervised token and the distillation-loss error of each storage dtype,
next to the top-k cache on the same student and tokens; and the bytes per token a side-process teacher ships.

For each dtype the real cache is written (``write_hidden_state_cache``: Arrow IPC shards, zstd) and read back with
``HiddenStateCache``; the teacher's logits are rebuilt from the stored states and its lm_head read alone from its
folder (``load_teacher_head``), and on every supervised position the loss against them is compared with the dense
loss against the teacher's own logits (its plain forward), for each divergence and temperature:

- ``bytes/token``: shard bytes / supervised tokens (metadata.json not counted);
- ``error``: (cached - dense) / dense, in %. The top-k row (k = 64, ``sqrt_uint8``, ``tail_bucket``) is the
  default top-k cache on the same tokens; reverse KL and JSD on a tail bucket are bounds, not the loss.

``--side_process``: the teacher in a ``TeacherProcess``; bytes received per token for logits (float32) and for final
hidden states (float32 and bfloat16 on the wire), counted by the proxy on one batch.

    python benchmarks/hidden_cache.py --teacher embedded:date-teacher --student pruned:2 --examples 64
    python benchmarks/hidden_cache.py --teacher packaged:smollm2-135m-instruct --student pruned:15 --examples 32 \
        --prompt_style verbose --side_process
    python benchmarks/hidden_cache.py --teacher packaged:gemma3-270m --student pruned:9 --examples 8 \
        --prompt_style verbose
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR, machine_info, write_json  # noqa: E402
from benchmarks.teacher_cache import build_student  # noqa: E402
from kd_llm.data.collator import CausalLMCollator  # noqa: E402
from kd_llm.data.sources import build_dataset, load_records  # noqa: E402
from kd_llm.losses.fused import soft_cap  # noqa: E402
from kd_llm.losses.kd_loss import token_divergence  # noqa: E402
from kd_llm.losses.sparse import SPARSE_DIVERGENCES, SparseTargets, sparse_token_divergence  # noqa: E402
from kd_llm.models.lm_head import HIDDEN_STATE_FORWARD_KWARGS, load_teacher_head  # noqa: E402
from kd_llm.models.loading import load_model, load_tokenizer  # noqa: E402
from kd_llm.models.vocab import tokenizer_vocab_size  # noqa: E402
from kd_llm.teacher_cache import TeacherCache, write_teacher_cache  # noqa: E402
from kd_llm.teacher_cache.hidden_cache import HiddenStateCache, write_hidden_state_cache  # noqa: E402

CHUNK = 128  # rows per loss evaluation: a few [128, V] buffers, whatever the vocabulary


def mean_divergence(student_logits, teacher_rows, loss: str, temperature: float) -> float:
    """Mean over rows of the per-token divergence; ``teacher_rows(start, stop)`` gives the teacher's logits."""
    total = 0.0
    for start in range(0, student_logits.shape[0], CHUNK):
        stop = min(start + CHUNK, student_logits.shape[0])
        total += token_divergence(student_logits[start:stop], teacher_rows(start, stop), loss=loss,
                                  temperature=temperature).double().sum().item()
    return total / student_logits.shape[0]


def rows_of(targets: SparseTargets, start: int, stop: int) -> SparseTargets:
    return SparseTargets(targets.token_ids[start:stop], targets.log_probs[start:stop], targets.log_tail[start:stop],
                         targets.temperature)


def collect(teacher, student, dataset, collator, vocab: int):
    """Teacher logits, teacher final hidden states and student logits at every supervised position."""
    teacher_logits, teacher_hidden, student_logits = [], [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            batch = collator([dataset[i] for i in range(start, min(start + 4, len(dataset)))])
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            valid = batch["labels"][:, 1:] != -100
            outputs = teacher(**inputs, output_hidden_states=-1)
            teacher_logits.append(outputs.logits[:, :-1, :vocab][valid].float())
            teacher_hidden.append(outputs.hidden_states[-1][:, :-1][valid].float())
            student_logits.append(student(**inputs).logits[:, :-1, :vocab][valid].float())
    return torch.cat(teacher_logits), torch.cat(teacher_hidden), torch.cat(student_logits)


def side_process_bytes(spec: str, dataset, collator) -> dict:
    from kd_llm.training.teacher_process import TeacherProcess

    batch = collator([dataset[i] for i in range(min(4, len(dataset)))])
    tokens = batch["input_ids"].numel()
    out = {}
    for transport in ("float32", "bfloat16"):
        with TeacherProcess(spec, num_threads=1, hidden_states=True, transport_dtype=transport) as proxy:
            if transport == "float32":
                proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                out["logits float32"] = proxy.bytes_received / tokens
                proxy.bytes_received = 0
            proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **HIDDEN_STATE_FORWARD_KWARGS)
            out[f"hidden states {transport}"] = proxy.bytes_received / tokens
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="embedded:date-teacher")
    parser.add_argument("--student", default="pruned:2")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--prompt_style", default="compact")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16,int8")
    parser.add_argument("--temperatures", default="1,2")
    parser.add_argument("--losses", default="forward_kl,reverse_kl,jsd")
    parser.add_argument("--top_k", type=int, default=64, help="the top-k cache row to compare with (0: none)")
    parser.add_argument("--side_process", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    tokenizer, teacher = load_tokenizer(args.teacher), load_model(args.teacher).eval()
    head = load_teacher_head(args.teacher)  # from the folder's safetensors: the head alone
    vocab = tokenizer_vocab_size(tokenizer)
    dataset = build_dataset(load_records("date_arithmetic", size=args.examples, seed=args.seed,
                                         prompt_style=args.prompt_style), tokenizer,
                            use_chat_template=tokenizer.chat_template is not None)  # Gemma-3-270M base: none
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CausalLMCollator(pad)
    texts = tokenizer.batch_decode(dataset["input_ids"][:4], skip_special_tokens=True)
    student = build_student(args.student, teacher, tokenizer, texts)
    teacher_logits, teacher_hidden, student_logits = collect(teacher, student, dataset, collator, vocab)
    weight = head.weight[:vocab]
    rebuilt_gap = (soft_cap(teacher_hidden[:CHUNK] @ weight.T, head.softcap) - teacher_logits[:CHUNK]).abs().max()

    memo = {}

    def hidden_fn(input_ids, attention_mask):
        key = (input_ids.numpy().tobytes(), attention_mask.numpy().tobytes(), tuple(input_ids.shape))
        if key not in memo:
            with torch.no_grad():
                memo[key] = teacher(input_ids=input_ids, attention_mask=attention_mask,
                                    **HIDDEN_STATE_FORWARD_KWARGS).hidden_states[-1]
        return memo[key]

    temperatures = [float(t) for t in args.temperatures.split(",")]
    losses = args.losses.split(",")
    dense = {(t, loss): mean_divergence(student_logits, lambda a, b: teacher_logits[a:b], loss, t)
             for t in temperatures for loss in losses}
    rows = []
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            metadata = write_hidden_state_cache(hidden_fn, dataset, folder, collator=collator, head=head,
                                                teacher=args.teacher, teacher_hash="-", tokenizer_hash="-",
                                                hidden_dtype=dtype, shard_size=len(dataset), progress=False)
            states = HiddenStateCache.open(folder, head=head).states_for(list(range(len(dataset))))
        row = {"format": f"hidden {dtype}", "bytes_per_token": round(metadata.total_bytes / metadata.supervised_tokens,
                                                                       1)}
        for (t, loss), value in dense.items():
            cached = mean_divergence(student_logits, lambda a, b: soft_cap(states[a:b] @ weight.T, head.softcap),
                                     loss, t)
            row[f"T={t:g} {loss}"] = {"dense": round(value, 6), "error_pct": round(100 * (cached - value) / value, 5)}
        rows.append(row)
        print(row, flush=True)
    if args.top_k:
        for t in temperatures:
            with tempfile.TemporaryDirectory() as folder:
                def logits_fn(input_ids, attention_mask):
                    with torch.no_grad():
                        return teacher(input_ids=input_ids, attention_mask=attention_mask).logits
                metadata = write_teacher_cache(logits_fn, dataset, folder, collator=collator, teacher=args.teacher,
                                               teacher_hash="-", tokenizer_hash="-", vocab_size=vocab, k=args.top_k,
                                               temperature=t, value_codec="sqrt_uint8", shard_size=len(dataset),
                                               progress=False)
                targets = TeacherCache.open(folder).targets_for(list(range(len(dataset))))
            row = {"format": f"top-{args.top_k} sqrt_uint8 (T={t:g})",
                   "bytes_per_token": round(metadata.total_bytes / metadata.supervised_tokens, 1)}
            for loss in losses:
                if loss not in SPARSE_DIVERGENCES["tail_bucket"]:
                    continue
                cached = sum(sparse_token_divergence(student_logits[a:a + CHUNK], rows_of(targets, a, a + CHUNK),
                                                     loss=loss, temperature=t, tail_mode="tail_bucket")
                             .double().sum().item() for a in range(0, len(student_logits), CHUNK))
                cached /= len(student_logits)
                value = dense[(t, loss)]
                row[f"T={t:g} {loss}"] = {"dense": round(value, 6), "error_pct": round(100 * (cached - value) / value, 5)}
            rows.append(row)
            print(row, flush=True)
    result = {"benchmark": "hidden_cache", "teacher": args.teacher, "student": args.student,
              "examples": len(dataset), "supervised_tokens": len(teacher_logits), "vocab_size": vocab,
              "hidden_size": head.hidden_size, "head_softcap": head.softcap, "head_tied": head.tied,
              "goal_bytes_per_token": 2 * head.hidden_size + 16,
              "max_abs_gap_model_logits_vs_softcap_head_h": float(rebuilt_gap), "rows": rows,
              "machine": machine_info()}
    if args.side_process:
        result["side_process_bytes_per_token"] = side_process_bytes(args.teacher, dataset, collator)
        print(result["side_process_bytes_per_token"])
    name = args.teacher.replace(":", "_").replace("/", "_")
    write_json(args.output or RESULTS_DIR / f"hidden_cache_{name}.json", result)
    return result


if __name__ == "__main__":
    main()
