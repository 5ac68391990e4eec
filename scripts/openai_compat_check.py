#!/usr/bin/env python3
"""Side by side: the same requests straight to llama.cpp and through a Troop
gateway, with real clients (the official `openai` package, sync and async,
`langchain-openai` and `litellm`). Prints one line per check ("ok NAME" or
"FAIL NAME: why") and exits non-zero if any check failed.

usage: openai_compat_check.py DIRECT_BASE GATEWAY_BASE MODEL [TOOL_MODEL]

DIRECT_BASE and GATEWAY_BASE end in /v1. TOOL_MODEL is a model on the mesh
whose server calls tools (the 270M model does not), for the tool checks.
"""
import asyncio
import os
import sys
import traceback

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import openai  # noqa: E402
from openai import AsyncOpenAI, OpenAI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

FAILED = []


def check(name):
    def wrap(fn):
        try:
            fn()
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            FAILED.append(name)
            print(f"FAIL {name}: {e!r}", flush=True)
            traceback.print_exc(file=sys.stderr)
        return fn

    return wrap


def expect(cond, why):
    if not cond:
        raise AssertionError(why)


class City(BaseModel):
    city: str
    country: str


def main() -> int:
    direct_base, gw_base, model = sys.argv[1], sys.argv[2], sys.argv[3]
    tool_model = sys.argv[4] if len(sys.argv) > 4 else None
    direct = OpenAI(base_url=direct_base, api_key="x", max_retries=0)
    gw = OpenAI(base_url=gw_base, api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Name three colors."}]
    greedy = dict(model=model, messages=msgs, max_tokens=12, temperature=0, seed=1)

    @check("sync chat: same text, finish reason and usage")
    def _():
        a = direct.chat.completions.create(**greedy)
        b = gw.chat.completions.create(**greedy)
        expect(a.choices[0].message.content == b.choices[0].message.content,
               f"{a.choices[0].message.content!r} != {b.choices[0].message.content!r}")
        expect(a.choices[0].finish_reason == b.choices[0].finish_reason, "finish")
        expect(b.usage and b.usage.completion_tokens == a.usage.completion_tokens, f"usage {b.usage}")

    def stream_text(client, **kw):
        text, last, usage_chunks = "", None, 0
        for c in client.chat.completions.create(stream=True, **kw):
            if c.usage:
                usage_chunks += 1
                last = c.usage
            for ch in c.choices:
                text += ch.delta.content or ""
        return text, last, usage_chunks

    @check("stream: same text, usage chunk only when asked")
    def _():
        a = stream_text(direct, stream_options={"include_usage": True}, **greedy)
        b = stream_text(gw, stream_options={"include_usage": True}, **greedy)
        expect(a[0] == b[0] and a[0], f"{a[0]!r} != {b[0]!r}")
        expect(b[2] == 1 and b[1].completion_tokens == a[1].completion_tokens, f"usage {b[1]}")
        c = stream_text(gw, **greedy)
        expect(c[2] == 0, "a usage chunk nobody asked for")

    @check("async client stream")
    def _():
        async def run():
            client = AsyncOpenAI(base_url=gw_base, api_key="x", max_retries=0)
            text = ""
            async for c in await client.chat.completions.create(stream=True, **greedy):
                for ch in c.choices:
                    text += ch.delta.content or ""
            await client.close()
            return text
        text = asyncio.run(run())
        a = direct.chat.completions.create(**greedy).choices[0].message.content
        expect(text == a, f"{text!r} != {a!r}")

    @check("structured output: chat.completions.parse with a JSON schema")
    def _():
        kw = dict(model=model, max_tokens=48, temperature=0,
                  messages=[{"role": "user", "content": "Paris is the capital of which country? Answer in JSON."}],
                  response_format=City)
        a = direct.chat.completions.parse(**kw)
        b = gw.chat.completions.parse(**kw)
        expect(a.choices[0].message.parsed is not None, "direct did not parse")
        expect(b.choices[0].message.parsed == a.choices[0].message.parsed,
               f"{b.choices[0].message.parsed} != {a.choices[0].message.parsed}")

    @check("logprobs, whole and streamed")
    def _():
        kw = dict(greedy, logprobs=True, top_logprobs=2)
        a = direct.chat.completions.create(**kw).choices[0].logprobs
        b = gw.chat.completions.create(**kw).choices[0].logprobs
        expect(b and b.content and len(b.content) == len(a.content), f"{b}")
        expect(len(b.content[0].top_logprobs) == 2, "top_logprobs")
        expect([t.token for t in b.content] == [t.token for t in a.content], "tokens differ")
        streamed = [ch.logprobs for c in gw.chat.completions.create(stream=True, **kw)
                    for ch in c.choices if ch.logprobs and ch.logprobs.content]
        expect(streamed, "no logprobs in the stream")

    @check("stop and seed")
    def _():
        kw = dict(model=model, messages=msgs, max_tokens=40, temperature=0.8, seed=42, stop=["3"])
        a = direct.chat.completions.create(**kw).choices[0]
        b = gw.chat.completions.create(**kw).choices[0]
        expect(a.message.content == b.message.content, f"{a.message.content!r} != {b.message.content!r}")
        expect("3" not in (b.message.content or ""), "stop sequence in the text")

    @check("n = 2 through the gateway")
    def _():
        r = gw.chat.completions.create(n=2, **greedy)
        expect(sorted(c.index for c in r.choices) == [0, 1], f"{r.choices}")
        expect(all(c.message.content for c in r.choices), "empty choice")

    @check("completions endpoint")
    def _():
        kw = dict(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
        a = direct.completions.create(**kw)
        b = gw.completions.create(**kw)
        expect(a.choices[0].text == b.choices[0].text, f"{a.choices[0].text!r} != {b.choices[0].text!r}")

    @check("a prompt over the context: the same 4xx at once, then service as usual")
    def _():
        long = [{"role": "user", "content": "word " * 12000}]
        statuses = []
        for client in (direct, gw):
            try:
                client.chat.completions.create(model=model, messages=long, max_tokens=4)
                statuses.append(200)
            except openai.APIStatusError as e:
                statuses.append(e.status_code)
        expect(statuses[0] == statuses[1] and 400 <= statuses[0] < 500, f"statuses {statuses}")
        # An SDK with retries on: a 400 is not retried, and the next
        # request is served by the same (only) worker.
        retrying = OpenAI(base_url=gw_base, api_key="x", max_retries=2)
        try:
            retrying.chat.completions.create(model=model, messages=long, max_tokens=4)
            raise AssertionError("served a prompt over the context")
        except openai.BadRequestError:
            pass
        r = gw.chat.completions.create(**greedy)
        expect(r.choices[0].message.content, "no answer after the refusal")

    @check("langchain-openai")
    def _():
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(base_url=gw_base, api_key="x", model=model, max_tokens=12, temperature=0)
        out = llm.invoke("Name three colors.")
        expect(out.content, "empty answer")
        chunks = list(llm.stream("Name three colors."))
        expect("".join(c.content for c in chunks) == out.content, "stream differs")
        if tool_model:
            from langchain_core.tools import tool

            @tool
            def weather(city: str) -> str:
                """The weather in a city."""
                return "sunny"

            tl = ChatOpenAI(base_url=gw_base, api_key="x", model=tool_model).bind_tools([weather])
            msg = tl.invoke("What is the weather in Paris?")
            expect(msg.tool_calls and msg.tool_calls[0]["name"] == "weather", f"{msg.tool_calls}")
            expect(msg.tool_calls[0]["args"] == {"city": "Paris"}, f"{msg.tool_calls}")

    @check("litellm")
    def _():
        import litellm

        kw = dict(model=f"openai/{model}", api_base=gw_base, api_key="x",
                  messages=msgs, max_tokens=12, temperature=0)
        r = litellm.completion(**kw)
        expect(r.choices[0].message.content, "empty answer")
        text = "".join(c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **kw))
        expect(text == r.choices[0].message.content, f"{text!r} != {r.choices[0].message.content!r}")

    if tool_model:
        @check("tool calls with the openai client, whole and streamed")
        def _():
            tools = [{"type": "function", "function": {"name": "weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}}}}]
            kw = dict(model=tool_model, tools=tools, messages=[{"role": "user", "content": "Weather in Paris?"}])
            r = gw.chat.completions.create(**kw)
            call = r.choices[0].message.tool_calls[0]
            expect(call.function.name == "weather" and call.function.arguments == '{"city":"Paris"}', f"{call}")
            args = "".join(tc.function.arguments or "" for c in gw.chat.completions.create(stream=True, **kw)
                           for ch in c.choices for tc in (ch.delta.tool_calls or []))
            expect(args == '{"city":"Paris"}', args)

    print(f"[{'all passed' if not FAILED else str(len(FAILED)) + ' failed'}]")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
