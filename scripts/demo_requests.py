"""The demo's client: a few real requests through the official OpenAI client.

    python demo_requests.py BASE_URL MODEL
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="demo", max_retries=0)
traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

print(f"\n> chat completion, traceparent {traceparent}")
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write one sentence about the sea."}],
    max_tokens=32,
    temperature=0.7,
    seed=42,
    extra_headers={"traceparent": traceparent},
)
print(f"  {r.id}: {r.choices[0].message.content!r}")
print(f"  finish={r.choices[0].finish_reason} usage={r.usage.prompt_tokens}+{r.usage.completion_tokens}")

print("\n> streamed text completion")
print("  ", end="")
for chunk in client.completions.create(
    model=model, prompt="The three primary colours are", max_tokens=24, temperature=0, stream=True
):
    print(chunk.choices[0].text if chunk.choices else "", end="", flush=True)
print()

print("\n> a bad request (temperature 7)")
try:
    client.completions.create(model=model, prompt="x", max_tokens=4, temperature=7)
except openai.BadRequestError as e:
    print(f"  {e.status_code}: {e.body.get('message') if isinstance(e.body, dict) else e.body}")
