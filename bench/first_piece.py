#!/usr/bin/env python3
"""Time to the first piece of a streamed answer to a request that offers a function: the
call's first `tool_calls` delta (a forced call) or the first content (an `auto` answer the
model writes as text), and to the end of the answer. Medians of a few requests each.

    python3 bench/first_piece.py http://127.0.0.1:8080 [--model smollm2] [--requests 5] [--api-key KEY]
"""
import argparse
import json
import statistics
import time
import urllib.request

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
CASES = {
    "forced call": {"messages": [{"role": "user", "content": "What is the weather like in Oslo?"}],
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "auto, text": {"messages": [{"role": "system", "content": "You are a poet."},
                                {"role": "user", "content": "Write a short poem about the sea."}]},
}


def timed(args, extra: dict) -> tuple[float, float]:
    body = {"model": args.model, "temperature": 0, "max_tokens": 80, "stream": True, "tools": TOOLS, **extra}
    headers = {"content-type": "application/json"}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    request = urllib.request.Request(args.url + "/v1/chat/completions", json.dumps(body).encode(), headers)
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(request) as response:
        for line in response:
            if first is not None or not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[len(b"data: "):]).get("choices") or [{}]
            delta = choices[0].get("delta", {})
            if delta.get("tool_calls") or delta.get("content"):
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    return (first if first is not None else end), end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    for name, extra in CASES.items():
        samples = [timed(args, extra) for _ in range(args.requests)]
        first = statistics.median(sample[0] for sample in samples) * 1000
        whole = statistics.median(sample[1] for sample in samples) * 1000
        print(f"{name}: first piece p50 {first:.0f} ms, whole answer p50 {whole:.0f} ms")


if __name__ == "__main__":
    main()
