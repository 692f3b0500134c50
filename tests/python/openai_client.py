"""Talks to a running Isthmus gateway with the official `openai` Python package.

Verifies the gateway's certificate against the CA file it is given, with the X.509 flags that
Python 3.13 turns on by default (VERIFY_X509_STRICT, VERIFY_X509_PARTIAL_CHAIN) turned on here
too, whatever the Python version.
Exits non-zero, with the reason, if anything is not as an OpenAI client expects.
"""

import os
import ssl
import sys
from typing import Literal

import openai
import pydantic


class City(pydantic.BaseModel):
    """What the structured-output check asks for: a closed set, so a small model ends it."""

    name: Literal["Paris", "Lyon", "Marseille"]
    capital: bool


def main() -> None:
    context = ssl.create_default_context(cafile=os.environ["ISTHMUS_CA_FILE"])
    # What Python 3.13's create_default_context() sets by default.
    context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    client = openai.OpenAI(
        base_url=os.environ["ISTHMUS_BASE_URL"],
        api_key=os.environ["ISTHMUS_API_KEY"],
        http_client=openai.DefaultHttpxClient(verify=context),
        max_retries=0,
    )

    completion = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=16,
        temperature=0,
    )
    answer = completion.choices[0].message.content
    assert answer and answer.strip(), f"empty answer: {completion}"
    assert completion.choices[0].finish_reason in ("stop", "length"), completion
    assert completion.usage.completion_tokens >= 1, completion.usage
    assert completion.model == "smollm2", completion.model

    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(pieces)
    assert streamed.strip(), "empty streamed answer"
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens >= 1, usage

    # Structured output as the SDK does it: a pydantic model becomes a strict json_schema
    # response_format, and the SDK parses the answer back into the model.
    parsed = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Which city is the capital of France?"}],
        response_format=City,
        max_tokens=64,
        temperature=0,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City), parsed

    # A forced function call, as libraries ask for structured output through tools.
    forced_call = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Which city is the capital of France?"}],
        "tools": [openai.pydantic_function_tool(City, name="record_city")],
        "tool_choice": {"type": "function", "function": {"name": "record_city"}},
        "max_tokens": 64,
        "temperature": 0,
    }
    called = client.chat.completions.create(**forced_call)
    assert called.choices[0].finish_reason == "tool_calls", called
    tool_call = called.choices[0].message.tool_calls[0]
    assert tool_call.function.name == "record_city", tool_call
    City.model_validate_json(tool_call.function.arguments)

    # The same call streamed: the SDK's stream helper assembles the deltas (id and name
    # first, then the arguments in pieces) into the same call, parsed into the model.
    with client.chat.completions.stream(**forced_call) as stream:
        deltas = sum(1 for event in stream if event.type == "tool_calls.function.arguments.delta")
        final = stream.get_final_completion()
    streamed_call = final.choices[0].message.tool_calls[0]
    assert deltas > 1, f"arguments came in {deltas} deltas"
    assert streamed_call.function.name == "record_city", streamed_call
    assert streamed_call.function.arguments == tool_call.function.arguments, streamed_call
    assert isinstance(streamed_call.function.parsed_arguments, City), streamed_call

    # Log-probabilities in the SDK's types.
    scored = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = scored.choices[0].logprobs.content
    assert len(entries) == scored.usage.completion_tokens, scored
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in entries), entries
    assert "".join(bytes(entry.bytes).decode() for entry in entries) == scored.choices[0].message.content

    # Embeddings: the SDK asks for base64 and decodes it itself.
    embedded = client.embeddings.create(
        model="smollm2", input=["The invoice is overdue.", "Paris is in France."]
    )
    assert [item.index for item in embedded.data] == [0, 1], embedded
    for item in embedded.data:
        assert len(item.embedding) == 576, len(item.embedding)
        norm = sum(value * value for value in item.embedding) ** 0.5
        assert abs(norm - 1.0) < 1e-4, norm
    assert embedded.usage.prompt_tokens == embedded.usage.total_tokens > 0, embedded.usage

    # Legacy completions with a batch of prompts (as evaluation harnesses send them) and with
    # token ids: choices prompt-major, each prompt billed once.
    batch = client.completions.create(
        model="smollm2", prompt=["1, 2, 3, 4,", "Monday, Tuesday,"], max_tokens=3, temperature=0
    )
    assert [choice.index for choice in batch.choices] == [0, 1], batch
    assert all(choice.text for choice in batch.choices), batch
    assert 2 <= batch.usage.completion_tokens <= 6, batch.usage
    from_ids = client.completions.create(model="smollm2", prompt=[504, 2365, 6354], max_tokens=2)
    assert from_ids.usage.prompt_tokens == 3, from_ids.usage

    # The Responses API, as the SDK's own helpers use it: the text, the stream of typed
    # events assembled into the final response, structured output and a forced function call.
    response = client.responses.create(
        model="smollm2",
        instructions="You answer briefly.",
        input="What is the capital of France?",
        max_output_tokens=16,
        temperature=0,
    )
    assert response.output_text.strip(), f"empty answer: {response}"
    assert response.status in ("completed", "incomplete"), response
    assert response.usage.output_tokens >= 1, response.usage
    with client.responses.stream(
        model="smollm2",
        instructions="You answer briefly.",
        input="What is the capital of France?",
        max_output_tokens=16,
        temperature=0,
    ) as stream:
        deltas, final = [], None
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            # `incomplete` when max_output_tokens cut the answer, as OpenAI says it.
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert final is not None and final.status == response.status, final
    assert "".join(deltas) == final.output_text == response.output_text, (deltas, final)
    parsed_response = client.responses.parse(
        model="smollm2",
        input="Which city is the capital of France?",
        text_format=City,
        max_output_tokens=64,
        temperature=0,
    )
    assert isinstance(parsed_response.output_parsed, City), parsed_response
    forced_response_call = {
        "model": "smollm2",
        "input": "Which city is the capital of France?",
        "tools": [{"type": "function", "name": "record_city", "parameters": City.model_json_schema(),
                   "strict": False}],
        "tool_choice": {"type": "function", "name": "record_city"},
        "max_output_tokens": 64,
        "temperature": 0,
    }
    called_response = client.responses.create(**forced_response_call)
    calls = [item for item in called_response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "record_city", called_response
    City.model_validate_json(calls[0].arguments)
    # The same call streamed: the SDK assembles the argument deltas into the same call.
    with client.responses.stream(**forced_response_call) as stream:
        argument_deltas = sum(1 for event in stream if event.type == "response.function_call_arguments.delta")
        streamed_response = stream.get_final_response()
    streamed_calls = [item for item in streamed_response.output if item.type == "function_call"]
    assert argument_deltas > 1, f"arguments came in {argument_deltas} deltas"
    assert [(call.name, call.arguments) for call in streamed_calls] == [
        (calls[0].name, calls[0].arguments)
    ], streamed_response
    # Stored responses, as the SDK reads, continues, lists and deletes them.
    assert response.store is True, response
    assert client.responses.retrieve(response.id).output_text == response.output_text
    items = list(client.responses.input_items.list(response.id, limit=1))
    assert [item.type for item in items] == ["message"], items
    assert items[0].content[0].text == "What is the capital of France?", items
    follow_up = client.responses.create(
        model="smollm2",
        previous_response_id=response.id,
        input="And of Italy?",
        max_output_tokens=8,
        temperature=0,
    )
    assert follow_up.previous_response_id == response.id, follow_up
    # The model read the conversation (the earlier instructions are not carried over).
    same = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": response.output_text},
            {"role": "user", "content": "And of Italy?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert follow_up.usage.input_tokens == same.usage.prompt_tokens, (follow_up.usage, same.usage)
    assert follow_up.output_text == same.choices[0].message.content, (follow_up, same)
    # Paged by the SDK through `after`: the question, the answer, the follow-up.
    history = list(client.responses.input_items.list(follow_up.id, order="asc", limit=1))
    assert [getattr(item, "role", None) for item in history] == ["user", "assistant", "user"], history
    client.responses.delete(response.id)
    try:
        client.responses.retrieve(response.id)
        raise AssertionError("a deleted response was served")
    except openai.NotFoundError as error:
        assert error.body["code"] == "response_not_found", error.body
    try:
        client.responses.create(model="smollm2", input="Hi", previous_response_id=response.id)
        raise AssertionError("a deleted response was continued")
    except openai.BadRequestError as error:
        assert error.body["param"] == "previous_response_id", error.body

    # What libraries call to check a model before using it.
    assert [model.id for model in client.models.list()][:1] == ["smollm2"]
    retrieved = client.models.retrieve("smollm2")
    assert (retrieved.id, retrieved.object) == ("smollm2", "model"), retrieved
    try:
        client.models.retrieve("no-such-model")
        raise AssertionError("an unknown model was retrieved")
    except openai.NotFoundError as error:
        assert error.body["code"] == "model_not_found", error.body

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as error:
        assert error.status_code == 404
        assert error.body["code"] == "model_not_found", error.body

    print(f"ok: {answer!r} / streamed {chunks} chunks, {usage.completion_tokens} tokens / {city!r}")


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # noqa: BLE001 - report any failure to the Rust test
        print(f"FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
