#!/usr/bin/env python3
"""Engine vs llama.cpp's llama-server: the same closed load against both.

Each round sends N concurrent non-streamed /v1/completions (fixed prompts,
temperature 0, max_tokens fixed; llama-server also gets ignore_eos and
cache_prompt=false so it neither stops early nor reuses a previous round's KV)
to each server in turn, the order alternating per round so both see the same
machine noise. Figures per run: completion tokens / wall time (first send to
last reply), and the server's CPU ms per generated token from
/proc/<pid>/stat. Writes a markdown section (median with min-max over rounds,
same-round ratio engine / llama-server) to --report and prints it.

Standard library only: runs with any python3.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

PROMPTS = [
    "The history of the city of Rome begins in the eighth century before our era, when",
    "In mathematics, a prime number is a natural number greater than one that",
    "The steam engine changed the way goods were made and moved, because",
    "Photosynthesis is the process by which green plants and some other organisms",
]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(server, clients, max_tokens):
    """N concurrent requests; returns (tokens/s, cpu ms/token, tokens)."""
    url = f"http://127.0.0.1:{server['port']}/v1/completions"
    out = [None] * clients
    errors = []

    def send(i):
        body = {"model": server["model"], "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens, "temperature": 0, "stream": False}
        if server["kind"] == "llama":
            body.update({"ignore_eos": True, "cache_prompt": False})
        req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                out[i] = json.load(r)
        except Exception as e:  # reported below: a broken harness, not a figure
            errors.append(f"{server['name']}: {e}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
    c0 = cpu_seconds(server["pid"])
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(server["pid"]) - c0
    if errors:
        sys.exit("peer_load: " + "; ".join(errors))
    tokens = sum(o["usage"]["completion_tokens"] for o in out)
    return tokens / wall, 1000 * cpu / max(tokens, 1), tokens


def fmt(values, digits=2):
    if not values:
        return "–"
    m = statistics.median_high(values) if len(values) % 2 == 0 else statistics.median(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine-port", type=int, required=True)
    ap.add_argument("--engine-pid", type=int, required=True)
    ap.add_argument("--llama-port", type=int, required=True)
    ap.add_argument("--llama-pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--context", default="", help="a line about the setup, put in the report")
    ap.add_argument("--report", help="write the markdown section here")
    a = ap.parse_args()
    servers = [
        {"name": "engine", "kind": "engine", "port": a.engine_port, "pid": a.engine_pid, "model": "bench"},
        {"name": "llama-server", "kind": "llama", "port": a.llama_port, "pid": a.llama_pid, "model": "bench"},
    ]
    # Warm up both (the first requests page the model in).
    for s in servers:
        one_run(s, a.clients, 8)
    res = {s["name"]: {"tps": [], "cpu": []} for s in servers}
    ratios, loads = [], []
    for r in range(a.rounds):
        loads.append(os.getloadavg()[0])
        order = servers if r % 2 == 0 else servers[::-1]
        this = {}
        for s in order:
            tps, cpu, tokens = one_run(s, a.clients, a.max_tokens)
            res[s["name"]]["tps"].append(tps)
            res[s["name"]]["cpu"].append(cpu)
            this[s["name"]] = tps
            print(json.dumps({"round": r, "server": s["name"], "tok_per_s": round(tps, 2),
                              "cpu_ms_per_tok": round(cpu, 2), "tokens": tokens}), file=sys.stderr)
        ratios.append(this["engine"] / this["llama-server"])
    lines = [
        "## Engine vs llama.cpp's llama-server\n",
        a.context + "\n" if a.context else "",
        f"{a.clients} concurrent clients × {a.max_tokens} tokens, non-streamed `/v1/completions`, temperature 0, "
        f"{a.rounds} rounds, order alternating; 1-minute load average during the rounds: {fmt(loads, 1)}.\n",
        "| server | tokens/s | CPU ms per token |",
        "|---|---|---|",
    ]
    for s in servers:
        lines.append(f"| {s['name']} | {fmt(res[s['name']]['tps'])} | {fmt(res[s['name']]['cpu'])} |")
    lines.append(f"| **engine ÷ llama-server (same round)** | **{fmt(ratios, 3)}** | |\n")
    lines.append("Target (issue 7): ≥ 1.0 in tokens/s.\n")
    text = "\n".join(l for l in lines if l != "")
    print(text)
    if a.report:
        with open(a.report, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
