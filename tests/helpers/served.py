"""Served-teacher test helpers: real ``scripts/serve_teacher.py`` processes on 127.0.0.1, and a fault-injecting proxy.

Every server and proxy binds 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVE_SCRIPT = REPO / "scripts" / "serve_teacher.py"
START_SECONDS = 120


class ServerProcess:
    """``scripts/serve_teacher.py --teacher <folder>`` in a subprocess; ``url`` once it listens."""

    def __init__(self, teacher, workdir: Path, *, port: int = 0, token: str | None = None, extra: tuple = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = self.workdir / f"url-{time.monotonic_ns()}"
        self.log_path = self.workdir / f"server-{time.monotonic_ns()}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
               "TOKENIZERS_PARALLELISM": "false"}
        env.pop("KD_LLM_TEACHER_TOKEN", None)
        if token is not None:
            env["KD_LLM_TEACHER_TOKEN"] = token
        command = [sys.executable, str(SERVE_SCRIPT), "--teacher", str(teacher), "--host", "127.0.0.1",
                   "--port", str(port), "--port-file", str(self.port_file), "--threads", "1", *extra]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = self._wait()

    def _wait(self) -> str:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.port_file.exists():
                return self.port_file.read_text().strip()
            if self.process.poll() is not None:
                raise RuntimeError(f"serve_teacher.py exited ({self.process.returncode}):\n{self.output()}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"serve_teacher.py did not listen within {START_SECONDS} s:\n{self.output()}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in a background thread that forwards to ``upstream`` and injects the faults
    queued with :meth:`inject` into the next scoring requests (``POST``): ``"500"``, ``"reset"`` (half the body, then
    the connection is aborted), ``"corrupt"`` (one payload byte flipped), ``"delay"`` (answers after ``delay``
    seconds), ``"garbage"`` (a 200 answer that is not the signal)."""

    def __init__(self, upstream: str, *, delay: float = 3.0):
        self.upstream, self.delay = upstream, delay
        self.faults: list[str] = []
        self.forwarded = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fault proxy did not start")

    def inject(self, *faults: str) -> None:
        self.faults.extend(faults)

    def _run(self, ready):
        from aiohttp import ClientSession, web

        asyncio.set_event_loop(self._loop)

        async def handle(request: web.Request):
            body = await request.read()
            fault = self.faults.pop(0) if request.method == "POST" and self.faults else None
            if fault == "500":
                return web.Response(status=500, text="injected failure")
            if fault == "delay":
                await asyncio.sleep(self.delay)
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
            async with self.session.request(request.method, self.upstream + request.path_qs, data=body,
                                            headers=headers) as upstream:
                payload = await upstream.read()
                status, kept = upstream.status, {k: v for k, v in upstream.headers.items()
                                                 if k.lower() in ("content-type", "x-kd-teacher-hash")}
            self.forwarded += 1
            if fault == "garbage":
                return web.Response(status=200, body=b"<html>proxy error</html>", headers=kept)
            if fault == "corrupt":
                payload = bytearray(payload)
                payload[-5] ^= 0xFF
                payload = bytes(payload)
            if fault == "reset":
                response = web.StreamResponse(status=status, headers=kept)
                response.content_length = len(payload)
                await response.prepare(request)
                await response.write(payload[: len(payload) // 2])
                request.transport.abort()
                return response
            return web.Response(status=status, body=payload, headers=kept)

        async def start():
            self.session = ClientSession()
            app = web.Application(client_max_size=256 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", handle)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop():
            await self.session.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_tiny_teacher(folder: Path, tokenizer, *, seed: int, hidden: int = 48) -> Path:
    from tests.conftest import tiny_llama

    tiny_llama(len(tokenizer), hidden=hidden, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
