"""Checks the request features that choose tokens on the host from a logits row against a
running Isthmus (bench/gpu/run-gpu.sh features): a JSON schema answer, log-probabilities
whole and streamed, and several choices. The model's weights are random, so the checks are
about shape, never about content. Exits non-zero on the first failure."""

import json
import sys
import urllib.request

BASE = sys.argv[1]


def post(body):
    request = urllib.request.Request(
        BASE + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


def chat(extra):
    body = {"model": "smollm2", "temperature": 0,
            "messages": [{"role": "user", "content": "Describe a city."}]}
    body.update(extra)
    return body


schema = {"type": "object", "additionalProperties": False,
          "required": ["country", "capital", "rank"],
          "properties": {"country": {"type": "string", "enum": ["France", "Italy", "Spain"]},
                         "capital": {"type": "boolean"},
                         "rank": {"type": "integer", "minimum": 0, "maximum": 99}}}
answer = json.loads(post(chat({"max_tokens": 200, "response_format": {
    "type": "json_schema", "json_schema": {"name": "city", "schema": schema}}})))
content = answer["choices"][0]["message"]["content"]
value = json.loads(content)
assert answer["choices"][0]["finish_reason"] == "stop", answer
assert list(value) == ["country", "capital", "rank"], content
assert value["country"] in ("France", "Italy", "Spain") and isinstance(value["capital"], bool)
assert 0 <= value["rank"] <= 99, content
print(f"json_schema: {content!r}")

scored = json.loads(post(chat({"max_tokens": 24, "ignore_eos": True, "logprobs": True,
                               "top_logprobs": 3})))
entries = scored["choices"][0]["logprobs"]["content"]
assert len(entries) == 24, scored
assert b"".join(bytes(e["bytes"]) for e in entries).decode(errors="replace") \
    == scored["choices"][0]["message"]["content"]
for entry in entries:
    assert entry["top_logprobs"][0]["logprob"] == entry["logprob"], entry
    assert all(a["logprob"] >= b["logprob"] for a, b in zip(entry["top_logprobs"], entry["top_logprobs"][1:]))
streamed = post(chat({"max_tokens": 24, "ignore_eos": True, "logprobs": True, "top_logprobs": 3,
                      "stream": True}))
chunks = [json.loads(line[6:]) for line in streamed.split("\n")
          if line.startswith("data: {")]
streamed_entries = [entry for chunk in chunks for choice in chunk["choices"]
                    if choice.get("logprobs") for entry in choice["logprobs"]["content"]]
assert streamed_entries == entries, "streamed logprobs differ from whole"
print(f"logprobs: {len(entries)} tokens, first {entries[0]['token']!r} {entries[0]['logprob']:.4f}")

several = json.loads(post(chat({"max_tokens": 16, "n": 3, "temperature": 1.0, "seed": 3})))
assert [choice["index"] for choice in several["choices"]] == [0, 1, 2], several
assert several["usage"]["completion_tokens"] >= 3, several
print(f"n=3: {several['usage']}")
print("features ok")
