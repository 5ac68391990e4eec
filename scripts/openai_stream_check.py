#!/usr/bin/env python3
"""Streams one chat completion through a Troop gateway with the official
`openai` client and prints it. Exits non-zero unless real text arrived and
the stream ended with a finish reason.

usage: openai_stream_check.py BASE_URL MODEL [QUESTION]
"""
import sys

from openai import OpenAI


def main() -> int:
    base_url, model = sys.argv[1], sys.argv[2]
    question = sys.argv[3] if len(sys.argv) > 3 else "Name three colors."
    client = OpenAI(base_url=base_url, api_key="troop-local")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=24,
        temperature=0,  # greedy: the answer is stable enough to check its meaning
        stream=True,
    )
    text, finish, chunks = "", None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta and choice.delta.content:
            text += choice.delta.content
            chunks += 1
            print(choice.delta.content, end="", flush=True)
        if choice.finish_reason:
            finish = choice.finish_reason
    print()
    print(f"[{chunks} chunks, finish_reason={finish}]")
    return 0 if text.strip() and finish else 1


if __name__ == "__main__":
    sys.exit(main())
