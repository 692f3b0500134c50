"""Single-stream decode speed of an OpenAI-compatible endpoint, measured from the client.

Streams `--runs` chat completions of exactly `--max-tokens` tokens (the `ignore_eos`
extension, which llama-server and Isthmus honour) and reports, per run and as medians:
time to first token, and decode tokens/s = (tokens - 1) / (time of last token - time of first).

    python3 bench/single_stream.py --url https://127.0.0.1:8443 --cafile state/tls/ca.pem \
        --api-key isthmus-demo-key --model smollm2
"""

import argparse
import http.client
import json
import ssl
import statistics
import time
import urllib.parse


def one_run(args, context) -> tuple[float, float, int]:
    url = urllib.parse.urlparse(args.url)
    if url.scheme == "https":
        connection = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=600)
    else:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"},
    )
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {response.read()[:500]!r}")
    token_times = []
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content") is not None and "role" not in choice["delta"]:
                token_times.append(time.perf_counter())
    connection.close()
    tokens = len(token_times)
    ttft = token_times[0] - started
    decode = (tokens - 1) / (token_times[-1] - token_times[0])
    return ttft, decode, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--cafile")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    one_run(args, context)  # warm-up
    results = [one_run(args, context) for _ in range(args.runs)]
    for ttft, decode, tokens in results:
        print(f"ttft {ttft * 1000:7.1f} ms  decode {decode:6.1f} tok/s  ({tokens} tokens)")
    print(
        json.dumps(
            {
                "url": args.url,
                "runs": args.runs,
                "max_tokens": args.max_tokens,
                "ttft_ms_median": round(statistics.median(r[0] for r in results) * 1000, 1),
                "decode_tokens_per_s_median": round(statistics.median(r[1] for r in results), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
