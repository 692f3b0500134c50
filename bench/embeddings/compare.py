#!/usr/bin/env python3
"""Isthmus's /v1/embeddings against llama-server's on the same model and threads.

Sends the same texts to both (one request per text, then batches of 16), and reports the
largest element difference and the smallest cosine similarity between the two vectors of each
text, the token counts, and the inputs embedded per second by each. Both must be running:

    llama-server -m MODEL --embeddings --pooling mean -t 2 -c 2048 --port 18200
    isthmus serve --config CONFIG            # the same model, plain listener

    bench/embeddings/compare.py --isthmus http://127.0.0.1:18080 --api-key KEY \
        --model smollm2 --anchor http://127.0.0.1:18200 [--texts 256] [--rounds 3]
"""

import argparse
import json
import math
import random
import time
import urllib.request

WORDS = (
    "invoice customer refund policy shipment delay warehouse contract clause renewal "
    "the a of to and in for on with at by from about model gateway edge cloud latency "
    "patient record diagnosis appointment insurance claim payment card account balance "
    "summary report quarter revenue forecast budget team meeting schedule project risk"
).split()


def texts(count, seed=7):
    generator = random.Random(seed)
    return [
        " ".join(generator.choice(WORDS) for _ in range(generator.randint(4, 120)))
        for _ in range(count)
    ]


def post(url, body, api_key=None):
    request = urllib.request.Request(
        url + "/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    if api_key:
        request.add_header("authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def embed(url, model, inputs, batch, api_key=None):
    vectors, tokens = [], 0
    started = time.perf_counter()
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        answer = post(url, {"model": model, "input": chunk if batch > 1 else chunk[0]}, api_key)
        data = sorted(answer["data"], key=lambda item: item["index"])
        vectors.extend(item["embedding"] for item in data)
        tokens += answer["usage"]["prompt_tokens"]
    return vectors, tokens, time.perf_counter() - started


def cosine(left, right):
    dot = sum(a * b for a, b in zip(left, right))
    return dot / (math.sqrt(sum(a * a for a in left)) * math.sqrt(sum(b * b for b in right)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--isthmus", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--anchor", required=True)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    inputs = texts(arguments.texts)
    results = {}
    for batch in (1, 16):
        rates = {"isthmus": [], "llama-server": []}
        for round_index in range(arguments.rounds):
            # Alternate which goes first.
            order = ["isthmus", "llama-server"] if round_index % 2 == 0 else ["llama-server", "isthmus"]
            for name in order:
                if name == "isthmus":
                    vectors, tokens, seconds = embed(
                        arguments.isthmus, arguments.model, inputs, batch, arguments.api_key
                    )
                    ours, our_tokens = vectors, tokens
                else:
                    vectors, tokens, seconds = embed(arguments.anchor, arguments.model, inputs, batch)
                    theirs, their_tokens = vectors, tokens
                rates[name].append(len(inputs) / seconds)
        difference = max(abs(a - b) for left, right in zip(ours, theirs) for a, b in zip(left, right))
        similarity = min(cosine(left, right) for left, right in zip(ours, theirs))
        median = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
        results[f"batch {batch}"] = {
            "inputs": len(inputs),
            "max_abs_difference": difference,
            "min_cosine": similarity,
            "prompt_tokens": {"isthmus": our_tokens, "llama-server": their_tokens},
            "inputs_per_second_median": median,
            "ratio": median["isthmus"] / median["llama-server"],
            "rounds": rates,
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
