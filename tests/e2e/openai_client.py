"""Drives a running ringside-engine with the official OpenAI Python client.

Used by the Rust end-to-end tests (tests/tests/engine_e2e.rs): each scenario
checks what the client sees, exits non-zero with a message if something is
wrong, and prints one JSON object per request on stdout so the Rust side can
compare the engine's ring records with the responses.

    python openai_client.py BASE_URL MODEL basic
    python openai_client.py BASE_URL MODEL concurrent N
    python openai_client.py BASE_URL MODEL one
"""

import json
import sys
import threading

import openai

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def fail(message):
    print(f"openai_client: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def emit(kind, response_id, usage, finish_reason, stream, traceparent=None):
    print(
        json.dumps(
            {
                "operation": kind,
                "id": response_id,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "finish_reason": finish_reason,
                "stream": stream,
                "traceparent": traceparent,
            }
        ),
        flush=True,
    )


def chat(client, model, **kwargs):
    headers = kwargs.pop("extra_headers", None)
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name three colours of the rainbow."}],
        extra_headers=headers,
        **kwargs,
    )


def basic(client, model):
    # Chat, not streamed, with the caller's trace context.
    r = chat(client, model, max_tokens=12, temperature=0, extra_headers={"traceparent": TRACEPARENT})
    check(r.object == "chat.completion", f"object {r.object}")
    check(r.id.startswith("chatcmpl-"), f"id {r.id}")
    check(r.model == model, f"model {r.model}")
    check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
    check(r.usage.prompt_tokens > 0, "prompt tokens")
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")
    emit("chat", r.id, r.usage, r.choices[0].finish_reason, False, TRACEPARENT)

    # Chat, streamed, with a usage chunk.
    stream = chat(client, model, max_tokens=10, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    pieces, finish, usage, rid = [], None, None, None
    for chunk in stream:
        rid = chunk.id
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    check(usage is not None, "no usage chunk with include_usage")
    check(finish in ("stop", "length"), f"stream finish {finish}")
    check(len(pieces) <= usage.completion_tokens, "more content chunks than tokens")
    emit("chat", rid, usage, finish, True)

    # Text completion: max_tokens honoured with finish_reason length.
    c = client.completions.create(model=model, prompt="The capital of France is Paris. The capital of Italy is",
                                  max_tokens=5, temperature=0)
    check(c.object == "text_completion", c.object)
    check(c.choices[0].finish_reason == "length", f"finish {c.choices[0].finish_reason}")
    check(c.usage.completion_tokens == 5, f"completion tokens {c.usage.completion_tokens} != max_tokens 5")
    emit("text_completion", c.id, c.usage, "length", False)

    # Text completion, streamed.
    s = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                                  stream=True, stream_options={"include_usage": True})
    text, finish, usage, rid = "", None, None, None
    for chunk in s:
        rid = chunk.id
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text or ""
            finish = choice.finish_reason or finish
    check(usage is not None and usage.completion_tokens == 8, f"stream usage {usage}")
    check(finish == "length", f"stream finish {finish}")
    emit("text_completion", rid, usage, finish, True)

    # temperature 0 is greedy: the same prompt gives the same text.
    a = client.completions.create(model=model, prompt="One, two, three,", max_tokens=12, temperature=0)
    b = client.completions.create(model=model, prompt="One, two, three,", max_tokens=12, temperature=0)
    check(a.choices[0].text == b.choices[0].text, "temperature 0 is not deterministic")
    emit("text_completion", a.id, a.usage, a.choices[0].finish_reason, False)
    emit("text_completion", b.id, b.usage, b.choices[0].finish_reason, False)

    # seed + temperature reproduce, and the text is not always the greedy one.
    runs = [
        client.completions.create(model=model, prompt="My favourite food is", max_tokens=12,
                                  temperature=1.0, seed=seed)
        for seed in (7, 7, 8)
    ]
    check(runs[0].choices[0].text == runs[1].choices[0].text, "same seed, different text")
    for r in runs:
        emit("text_completion", r.id, r.usage, r.choices[0].finish_reason, False)

    # stop is honoured: generation ends there and the stop text is not returned.
    greedy = a.choices[0].text
    stop_at = next((ch for ch in greedy if ch.strip() and ch not in "0123456789"), None)
    if stop_at is None:
        stop_at = greedy.strip()[:1] or ","
    s = client.completions.create(model=model, prompt="One, two, three,", max_tokens=12, temperature=0,
                                  stop=[stop_at])
    check(stop_at not in s.choices[0].text, f"stop text {stop_at!r} returned in {s.choices[0].text!r}")
    check(s.choices[0].finish_reason == "stop", f"finish {s.choices[0].finish_reason} with stop")
    check(greedy.startswith(s.choices[0].text), "stop changed the text before it")
    emit("text_completion", s.id, s.usage, "stop", False)


def concurrent(client, model, n):
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = client.completions.create(
                model=model, prompt=f"Request {i}: list some animals:", max_tokens=24, temperature=0)
        except Exception as e:  # reported below
            errors.append(f"request {i}: {e!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, "; ".join(errors))
    for r in results:
        emit("text_completion", r.id, r.usage, r.choices[0].finish_reason, False)


def one(client, model):
    r = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0)
    emit("text_completion", r.id, r.usage, r.choices[0].finish_reason, False)


def main():
    base_url, model, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    if scenario == "basic":
        basic(client, model)
    elif scenario == "concurrent":
        concurrent(client, model, int(sys.argv[4]))
    elif scenario == "one":
        one(client, model)
    else:
        fail(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main()
