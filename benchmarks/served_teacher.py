"""A served teacher on loopback against a teacher cache: step time, the wait prefetch did not hide, bytes on the wire.

The same student trains the same steps twice: from a top-k teacher cache (built here, k = 64, T = 1) and from
scripts/serve_teacher.py serving the teacher on 127.0.0.1 (k = 64, T = 1, prefetch on). Reported:

- ``step s``: mean training step time, first step excluded; ``ratio``: served / cache;
- ``wait s/step``: time the training process waited for the server's answers (what prefetch did not hide);
- bytes per token on the wire (response bodies / tokens scored) for the same batch as vLLM-style JSON
  (``/v1/completions`` with ``prompt_logprobs=64``), kd_llm's binary top-k (``/kd/v1/signal``) and final hidden
  states (float32 and bfloat16).

On one machine the server's teacher forward shares the CPU with the student's step, which a teacher on another
machine would not. So a third run, ``replayed``, trains against a server process that answers the same requests
from the real teacher's answers computed beforehand (same identity, same binary bodies, no forward pass): the cost of
the protocol, the transfer and the prefetch alone, as with a teacher on other hardware that keeps up.

    python benchmarks/served_teacher.py --teacher packaged:smollm2-135m-instruct --student_layers 8 --steps 6
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def start_server(teacher: str, workdir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "url"
    command = [sys.executable, str(REPO / "scripts" / "serve_teacher.py"), "--teacher", teacher, "--port", "0",
               "--port-file", str(port_file), "--threads", str(threads)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("serve_teacher.py did not start")
        time.sleep(0.2)
    return process, port_file.read_text().strip()


def replay_server(answers_path: str, port_file: str) -> None:
    """A stand-in teacher server (``--replay``): the real teacher's identity and precomputed binary answers."""
    import asyncio

    from aiohttp import web

    from kd_llm.serving.protocol import (BINARY_CONTENT_TYPE, IDENTITY_PATH, SIGNAL_PATH, WEIGHTS_HASH_HEADER,
                                         encode_signal)

    saved = torch.load(answers_path, weights_only=True)
    identity = json.loads(saved["identity"])
    rows = dict(zip(saved["keys"], saved["rows"]))

    async def identity_handler(request):
        return web.json_response(identity)

    async def signal_handler(request):
        sequences = (await request.json())["sequences"]
        found = [rows.get(json.dumps(sequence)) for sequence in sequences]
        if any(r is None for r in found):
            return web.json_response({"error": {"message": "not a replayed example"}}, status=400)
        arrays = {"lengths": torch.tensor([len(s) for s in sequences]), "ids": torch.cat([r[0] for r in found]),
                  "log_probs": torch.cat([r[1] for r in found]), "log_tail": torch.cat([r[2] for r in found])}
        body = encode_signal(arrays, meta={"kind": "topk", "weights_hash": identity["weights_hash"]})
        return web.Response(body=body, content_type=BINARY_CONTENT_TYPE,
                            headers={WEIGHTS_HASH_HEADER: identity["weights_hash"]})

    async def run():
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get(IDENTITY_PATH, identity_handler)
        app.router.add_post(SIGNAL_PATH, signal_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        Path(port_file).write_text(f"http://127.0.0.1:{runner.addresses[0][1]}")
        await asyncio.Event().wait()

    asyncio.run(run())


def record_answers(served, dataset, k: int, path: Path) -> None:
    """The real teacher's top-k rows of every training example, for the replay server."""
    keys, rows = [], []
    for index in range(len(dataset)):
        sequence = list(dataset[index]["input_ids"])
        (ids, log_probs, tail), = served.topk([sequence], k=k, temperature=1.0)
        keys.append(json.dumps(sequence))
        rows.append((ids.to(torch.int32), log_probs.float(), tail.float()))
    torch.save({"identity": json.dumps(served.identity.to_dict()), "keys": keys, "rows": rows}, path)


def wire_bytes(url: str, sequences: list[list[int]], k: int) -> dict:
    import httpx

    tokens = sum(len(s) for s in sequences)
    sizes = {}
    with httpx.Client(timeout=600) as client:
        answer = client.post(url + "/v1/completions", json={"prompt": sequences, "max_tokens": 1,
                                                            "prompt_logprobs": k})
        sizes[f"top-{k} JSON (/v1/completions, vLLM format)"] = len(answer.content)
        for name, body in ((f"top-{k} binary (/kd/v1/signal)", {"kind": "topk", "k": k}),
                           ("hidden states float32 (/kd/v1/signal)", {"kind": "hidden", "dtype": "float32"}),
                           ("hidden states bfloat16 (/kd/v1/signal)", {"kind": "hidden", "dtype": "bfloat16"})):
            sizes[name] = len(client.post(url + "/kd/v1/signal", json={"sequences": sequences, **body}).content)
    return {name: round(size / tokens, 1) for name, size in sizes.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--student_layers", type=int, default=8, help="the student: the teacher's first N layers")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the server")
    parser.add_argument("--fused_loss", default="auto", help="the loss path of every run (auto, true, false)")
    parser.add_argument("--replay", nargs=2, metavar=("ANSWERS", "PORT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replay:
        return replay_server(*args.replay)
    torch.set_num_threads(args.threads)

    from kd_llm import DistillationConfig, DistillationTrainer
    from kd_llm.data.collator import CausalLMCollator
    from kd_llm.data.sources import build_dataset, load_records
    from kd_llm.models.loading import load_model, load_tokenizer
    from kd_llm.models.students import build_student
    from kd_llm.models.vocab import tokenizer_vocab_size
    from kd_llm.teacher_cache import write_teacher_cache
    from kd_llm.teacher_cache.metadata import state_dict_sha256, tokenizer_sha256
    from kd_llm.teacher_cache.writer import module_teacher_fn

    tokenizer = load_tokenizer(args.teacher)
    teacher = load_model(args.teacher).eval()
    records = load_records("date_arithmetic", size=args.examples, seed=5, prompt_style="verbose")
    dataset = build_dataset(records, tokenizer, max_length=256)
    student_state = build_student("pruned", teacher=teacher, layers=list(range(args.student_layers))).state_dict()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CausalLMCollator(pad)
    work = Path(tempfile.mkdtemp(prefix="kd_served_bench_"))
    write_teacher_cache(module_teacher_fn(teacher), dataset, work / "cache", collator=collator, teacher=args.teacher,
                        teacher_hash=state_dict_sha256(teacher), tokenizer_hash=tokenizer_sha256(tokenizer),
                        vocab_size=tokenizer_vocab_size(tokenizer), k=args.k, temperature=1.0, progress=False)

    def student():
        model = build_student("pruned", teacher=teacher, layers=list(range(args.student_layers)))
        model.load_state_dict(student_state)
        return model

    def run(name: str, **fields):
        timer = StepTimer()
        config = DistillationConfig(output_dir=str(work / name), max_steps=args.steps, learning_rate=1e-4,
                                    per_device_train_batch_size=args.batch_size, logging_steps=1000,
                                    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                                    alpha=0.5, temperature=1.0, fused_loss=args.fused_loss, **fields)
        trainer = DistillationTrainer(model=student(), args=config, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        steps = timer.times[1:]
        row = {"run": name, "step_s": round(sum(steps) / len(steps), 3), "steps_timed": len(steps),
               "target": getattr(getattr(trainer, "target", None), "name", None)
               or ("fused" if getattr(trainer, "fused_loss", False) else "dense")}
        signal = getattr(trainer, "served_teacher", None)
        if signal is not None:
            row["wait_s_per_step"] = round(signal.wait_seconds / max(len(timer.times), 1), 4)
            signal.close()
        return row

    cached = run("cache", teacher_cache=str(work / "cache"))
    sequences = [dataset[i]["input_ids"] for i in range(args.batch_size)]
    process, url = start_server(args.teacher, work, args.threads)
    try:
        served = run("served", teacher_url=url, teacher_top_k=args.k, teacher_parity_examples=0)
        wire = wire_bytes(url, sequences, args.k)
    finally:
        process.kill()
        process.wait()
    # The replay server: the same answers, precomputed by the real teacher, in the order the trainer asks.
    from kd_llm.serving.scoring import ServedModel

    record_answers(ServedModel(teacher, tokenizer, model_id=args.teacher), dataset, args.k, work / "answers.pt")
    replay = subprocess.Popen([sys.executable, __file__, "--replay", str(work / "answers.pt"),
                               str(work / "replay_url")], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not (work / "replay_url").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        replayed = run("replayed", teacher_url=(work / "replay_url").read_text(), teacher_top_k=args.k,
                       teacher_parity_examples=0)
    finally:
        replay.kill()
        replay.wait()
    for row in (served, replayed):
        row["ratio"] = round(row["step_s"] / cached["step_s"], 3)
    results = {"benchmark": "served_teacher", "teacher": args.teacher, "fused_loss": args.fused_loss, "student_layers": args.student_layers,
               "batch_size": args.batch_size, "k": args.k, "threads": args.threads, "runs": [cached, served, replayed],
               "wire_bytes_per_token": wire, "tokens_in_wire_batch": sum(len(s) for s in sequences),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
                          "shared and loaded (other jobs running)"}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "served_teacher.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
