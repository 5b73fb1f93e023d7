"""Serve a teacher to kd_llm training runs on other machines (or other processes): vLLM-compatible
``/v1/completions`` with ``prompt_logprobs``, plus kd_llm's binary top-k / hidden-state endpoint.

    pip install "kd_llm[serve]"
    python scripts/serve_teacher.py --teacher packaged:smollm2-135m-instruct --port 8000
    # on the student's machine:
    accelerate launch scripts/distill_llm.py --teacher http://TEACHER_HOST:8000 ...

Binds 127.0.0.1 unless --host says otherwise. A bearer token, if wanted, comes from the environment variable named by
--token-env (default KD_LLM_TEACHER_TOKEN) or from --token-file, never from the command line (which other users of
the machine can read); it is never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from pathlib import Path

from kd_llm.boundary import run_script
from kd_llm.serving.scoring import ServedModel
from kd_llm.serving.server import ServerLimits, TeacherServer, serve


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="any teacher kd_llm loads: folder, .gguf, packaged:<name>, "
                        "embedded:<name> or a Hub id (safetensors weights only)")
    parser.add_argument("--teacher-adapter", default=None, help="a PEFT (LoRA) adapter folder merged into it")
    parser.add_argument("--served-model-name", default=None, help="the model id clients see (default: --teacher)")
    parser.add_argument("--dtype", default="float32", help="weights dtype: float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model's own code (off by default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    parser.add_argument("--port-file", default=None, help="write the server's URL here once it listens")
    parser.add_argument("--token-env", default="KD_LLM_TEACHER_TOKEN",
                        help="environment variable holding the bearer token (unset: no token)")
    parser.add_argument("--token-file", default=None, help="file holding the bearer token")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-body-mb", type=float, default=64.0)
    parser.add_argument("--max-sequences", type=int, default=1024, help="sequences in one request")
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="tokens in one request")
    parser.add_argument("--max-batch-tokens", type=int, default=65536, help="tokens in one forward pass")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="wait for concurrent requests to batch")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get(args.token_env) or None
    if not ipaddress.ip_address(args.host if args.host != "localhost" else "127.0.0.1").is_loopback and not token:
        print(f"serve_teacher: WARNING: listening on {args.host} without a bearer token: anyone who reaches this "
              "port can use the teacher. Set a token (--token-env / --token-file).", file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    served = ServedModel.load(args.teacher, adapter=args.teacher_adapter, dtype=args.dtype, device=args.device,
                              trust_remote_code=args.trust_remote_code, model_id=args.served_model_name)
    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_sequences=args.max_sequences,
                          max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
                          batch_window=args.batch_window_ms / 1000)

    def ready(url: str) -> None:
        identity = served.identity
        print(f"serve_teacher: serving {identity.model_id} (weights {identity.weights_hash[:12]}, vocab "
              f"{identity.vocab_size}) on {url}", flush=True)
        if args.port_file:
            temporary = Path(f"{args.port_file}.tmp")
            temporary.write_text(url)
            temporary.replace(args.port_file)

    try:
        asyncio.run(serve(TeacherServer(served, token=token, limits=limits), host=args.host, port=args.port,
                          ready=ready))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run_script(main, "serve_teacher")
