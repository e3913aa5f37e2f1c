"""Peers pushing each step's output to the next hop, against the client relaying every hop:
one client generating through 3 peers (0:10, 10:20, 20:30), on loopback as it is and as if
every message crossed a network with a one-way delay.

The delay is the peers' bench flag `--link-delay`: a peer waits that long before it reads each
step of a session (from the client or pushed by the peer before it) and before it sends each
answer to the client, as if both had crossed a link. (A kernel delay, netem, is not available in
this sandbox.) With the client relaying, a token crosses 6 links; pushed, 4.

Run: .venv/bin/python bench/push.py   (about 3 minutes here)
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it (see swarm/cli.py)

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.weights import EMBEDDED_MODEL  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SPANS = ("0:10", "10:20", "20:30")


def measure(delay_ms: float, new_tokens: int, repeats: int) -> dict[str, float]:
    """Milliseconds per token (median over `repeats` generations, alternating) per mode."""
    from swarm.cli import encode_prompt
    from swarm.model import DistributedModelForCausalLM

    with LocalSwarm(EMBEDDED_MODEL) as local:
        local.start_bootstrap()
        for span in SPANS:
            local.start_peer(span, extra=["--link-delay", str(delay_ms / 1000)])
        models = {mode: DistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, local.initial_peers,
                                                                    push=mode == "push")
                  for mode in ("relay", "push")}
        try:
            local.wait_until_online(models["push"].view)
            ids = encode_prompt(models["push"].tokenizer(), PROMPT, chat=True)
            samples: dict[str, list[float]] = {mode: [] for mode in models}
            for model in models.values():  # warm-up: streams, caches, the peers' first batches
                model.generate(ids, max_new_tokens=4, min_new_tokens=4)
            for _ in range(repeats):
                for mode, model in models.items():
                    started = time.perf_counter()
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
                    samples[mode].append(1e3 * (time.perf_counter() - started) / new_tokens)
            return {mode: statistics.median(values) for mode, values in samples.items()}
        finally:
            for model in models.values():
                model.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delays-ms", type=float, nargs="*", default=[0.0, 10.0, 25.0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    rows = []
    for delay_ms in arguments.delays_ms:
        print(f"measuring with {delay_ms:g} ms added one way...", file=sys.stderr, flush=True)
        result = measure(delay_ms, arguments.tokens, arguments.repeats)
        relay, push = result["relay"], result["push"]
        rows.append(f"| {delay_ms:g} ms | {relay:.1f} | {push:.1f} | {relay / push:.2f}x |")
    print(f"| one-way delay per message | client relays every hop, ms/token | peers push, ms/token | "
          f"speed-up |  (3 peers, {arguments.tokens} greedy tokens, median of {arguments.repeats})")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
