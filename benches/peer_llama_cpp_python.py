#!/usr/bin/env python3
"""Runs a batch file through llama-cpp-python, one request after another, the way its users
would: one `Llama` object, whose KV cache keeps the previous prompt, so the shared system prompt
is reused whenever the next prompt starts with it. Run it with the interpreter of the virtual
environment benches/peers.sh builds.

Usage: peer_llama_cpp_python.py MODEL INPUT.jsonl --threads T --ctx C

Prints one JSON object: wall seconds, per-request time to first token, and llama.cpp's own
counters (prompt tokens evaluated, generated tokens, and the time in each).
"""
import argparse
import json
import time

import llama_cpp


def perf(llm):
    data = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return {
        "prompt_eval_tokens": data.n_p_eval,
        "prompt_eval_ms": data.t_p_eval_ms,
        "eval_tokens": data.n_eval,
        "eval_ms": data.t_eval_ms,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("input")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--ctx", type=int, required=True)
    a = ap.parse_args()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.ctx, n_threads=a.threads,
                          n_threads_batch=a.threads, n_batch=512, verbose=False)
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    requests = [json.loads(line) for line in open(a.input) if line.strip()]
    ttft = []
    t0 = time.monotonic()
    for req in requests:
        body = req["body"]
        sent = time.monotonic()
        first = None
        for chunk in llm.create_chat_completion(messages=body["messages"], max_tokens=body["max_tokens"],
                                                temperature=0.0, stream=True):
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.monotonic() - sent
        ttft.append(first if first is not None else time.monotonic() - sent)
    wall = time.monotonic() - t0
    print(json.dumps({"wall": wall, "requests": len(requests), "ttft": ttft, **perf(llm)}))


if __name__ == "__main__":
    main()
