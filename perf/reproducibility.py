#!/usr/bin/env python3
"""Identical requests, identical text? The reproducibility check of
tests/tests/engine_e2e.rs (identical_requests_give_identical_text_with_the_prompt_cache_under_load)
against any OpenAI-compatible server, so ringside-engine and llama-server are
compared on the same check (engine/README.md, "Reproducible sampling").

    perf/reproducibility.py --base-url http://127.0.0.1:8000/v1 --model NAME [--rounds 3]

A greedy (temperature 0) and a seeded (temperature 1, seed 7) completion of
the same prompt, first alone on an idle server, then `--rounds` times four at
once (two of each) while two threads send other traffic that shares the
prompt's prefix. Prints, per kind, how many distinct texts the identical
requests got (1 = reproducible) and the cached prompt tokens the server
reported; exits 1 if any kind got more than one text.
"""

import argparse
import sys
import threading

import openai

STORY = (
    "The lighthouse keeper climbed the stairs every evening at dusk, counting the "
    "steps as his father had taught him, and lit the great lamp that warned the fishing "
    "boats away from the rocks below. One winter night a storm rolled in from the north, "
    "the waves rose higher than the harbour wall, and a small boat with a torn sail "
    "drifted towards the reef while its crew shouted into the wind. "
)
PROMPT = STORY + "The keeper ran down to the shore and"
KINDS = {
    "temperature 0": {"temperature": 0},
    "seed 7": {"temperature": 1.0, "seed": 7},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)

    def complete(prompt, max_tokens, **sampling):
        r = client.completions.create(
            model=args.model, prompt=prompt, max_tokens=max_tokens, **sampling
        )
        details = getattr(r.usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details else None
        return r.choices[0].text, cached

    results = {kind: [] for kind in KINDS}
    for kind, sampling in KINDS.items():
        results[kind].append(complete(PROMPT, 24, **sampling))

    stop = threading.Event()

    def background(t):
        n = 0
        while not stop.is_set():
            n += 1
            prompt = (
                f"{STORY}Then, request {t}.{n}, the keeper"
                if (n + t) % 2 == 0
                else f"Request {t}.{n}: list some animals:"
            )
            complete(prompt, 6 + (n * 7 + t * 3) % 20, temperature=0.8)

    others = [threading.Thread(target=background, args=(t,)) for t in range(2)]
    for thread in others:
        thread.start()
    lock = threading.Lock()
    try:
        for _ in range(args.rounds):
            def one(kind):
                result = complete(PROMPT, 24, **KINDS[kind])
                with lock:
                    results[kind].append(result)

            batch = [threading.Thread(target=one, args=(kind,)) for kind in list(KINDS) * 2]
            for thread in batch:
                thread.start()
            for thread in batch:
                thread.join()
    finally:
        stop.set()
        for thread in others:
            thread.join()

    reproducible = True
    for kind, got in results.items():
        texts = {text for text, _ in got}
        cached = [c for _, c in got]
        reproducible &= len(texts) == 1
        print(f"{kind}: {len(got)} identical requests, {len(texts)} distinct text(s); "
              f"cached prompt tokens reported: {cached}")
        for text in sorted(texts):
            print(f"    {text!r}")
    return 0 if reproducible else 1


if __name__ == "__main__":
    sys.exit(main())
