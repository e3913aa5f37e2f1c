"""Inference speed: local transformers against the swarm with 1, 2 and 3 peers on loopback.

Greedy, 128 new tokens forced (EOS masked), after a warm-up, on the embedded SmolLM2-135M.
Also the attention cache at work: a step's time at prefix 16 and at prefix 512.
Prints a markdown table (the README's).  Run: .venv/bin/python bench/inference.py
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it (see swarm/cli.py), for all

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.weights import EMBEDDED_MODEL, load_full_model, open_model  # noqa: E402
from swarm.demo import split_blocks  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.model import DistributedModelForCausalLM  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def timed_generate(generate, input_ids, new_tokens: int, repeats: int) -> float:
    """Best tokens/s over `repeats` runs (after one warm-up run)."""
    generate(input_ids, 8)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = generate(input_ids, new_tokens)
        elapsed = time.perf_counter() - started
        assert output.shape[1] - input_ids.shape[1] == new_tokens
        rates.append(new_tokens / elapsed)
    return max(rates)


def step_times(model: DistributedModelForCausalLM, prefixes=(16, 512), steps: int = 20) -> dict[int, float]:
    """Median seconds of a one-token step after a prefix of each length."""
    times = {}
    for prefix in prefixes:
        with model.inference_session(max_length=prefix + steps + 1) as session:
            tokens = torch.randint(100, 1000, (1, prefix))
            session.step(model.embed_tokens(tokens))
            samples = []
            for _ in range(steps):
                started = time.perf_counter()
                hidden = session.step(model.embed_tokens(torch.tensor([[500]])))
                model.logits_from_hidden(hidden[:, -1])
                samples.append(time.perf_counter() - started)
            times[prefix] = statistics.median(samples)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", type=int, nargs="*", default=[1, 2, 3])
    arguments = parser.parse_args()

    store = open_model(EMBEDDED_MODEL)
    local_model, tokenizer = load_full_model(EMBEDDED_MODEL)
    local_model.eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    eos = tokenizer.eos_token_id

    def local_generate(ids, n):
        with torch.no_grad():
            return local_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=eos)

    local_rate = timed_generate(local_generate, input_ids, arguments.new_tokens, arguments.repeats)
    print(f"local transformers: {local_rate:.1f} tokens/s", file=sys.stderr, flush=True)
    del local_model
    rows = [("local transformers", local_rate, 1.0)]
    cache_times = None
    for num_peers in arguments.peers:
        with LocalSwarm(EMBEDDED_MODEL) as local:
            local.start_bootstrap()
            for span in split_blocks(store.num_blocks, num_peers):
                local.start_peer(span)
            with DistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, local.initial_peers) as model:
                local.wait_until_online(model.view)

                def swarm_generate(ids, n):
                    return model.generate(ids, max_new_tokens=n, min_new_tokens=n)

                rate = timed_generate(swarm_generate, input_ids, arguments.new_tokens, arguments.repeats)
                print(f"swarm, {num_peers} peers: {rate:.1f} tokens/s", file=sys.stderr, flush=True)
                rows.append((f"swarm, {num_peers} peer{'s' if num_peers > 1 else ''}", rate, rate / local_rate))
                if num_peers == 2:
                    cache_times = step_times(model)

    print(f"\n| setup (greedy, {arguments.new_tokens} new tokens, SmolLM2-135M fp32) | tokens/s | vs local |")
    print("|---|---|---|")
    for name, rate, ratio in rows:
        print(f"| {name} | {rate:.1f} | {ratio:.2f} |")
    if cache_times:
        short, long = cache_times[16], cache_times[512]
        print(f"\nstep time through 2 peers: prefix 16: {short * 1000:.1f} ms, prefix 512: {long * 1000:.1f} ms "
              f"(ratio {long / short:.2f})")


if __name__ == "__main__":
    main()
