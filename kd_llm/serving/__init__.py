"""A teacher served over HTTP: kd_llm's own server (scripts/serve_teacher.py) or vLLM's OpenAI-compatible API.

- :mod:`.protocol`: the teacher's identity, the binary signal body, vLLM's ``prompt_logprobs`` format (no HTTP);
- :mod:`.scoring`: the teacher a server holds and the signals it computes (no HTTP);
- :mod:`.server`: the aiohttp server; :mod:`.client`: the httpx client (replicas, retries, routing, prefetch).

The HTTP modules need ``pip install "kd_llm[serve]"``; nothing else in kd_llm imports them unless a served teacher
is used.
"""
