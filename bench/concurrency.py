"""Many users at once: aggregate tokens/s of 4 clients generating together through 3 peers,
next to one client alone. Each client is its own process (as users are); the peers batch
the steps of concurrent sessions. Two swarms in one run: peers that batch only the steps that
happen to be waiting (`--batch-wait 0`, as before), then peers with the default wait for the
next steps of other generating sessions due soon.

Run: .venv/bin/python bench/concurrency.py   (about 3 minutes here)
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it (see swarm/cli.py)

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.network import die_with_parent  # noqa: E402
from protocol.weights import EMBEDDED_MODEL  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402

CLIENT_ENVIRONMENT = dict(item.split("=", 1) for item in os.environ.get("BENCH_CLIENT_ENV", "").split() if item)
PROMPTS = ["Write a poem about the sea.", "Tell me a story about a cat.", "Explain why the sky is blue.",
           "Describe a walk in the forest."]


def client(initial_peers: list[str], prompt: str, new_tokens: int) -> None:
    import torch

    from swarm.cli import encode_prompt
    from swarm.model import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers) as model:
        ids = encode_prompt(model.tokenizer(), prompt, chat=True)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4)  # warm-up
        print("ready", flush=True)
        sys.stdin.readline()  # everyone starts together
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        print(json.dumps({"start": started, "end": time.perf_counter(), "tokens": new_tokens}), flush=True)
        del torch


def run_clients(initial_peers: list[str], count: int, new_tokens: int) -> float:
    command = [sys.executable, __file__, "--client", "--tokens", str(new_tokens), "--initial-peers", *initial_peers]
    environment = {**os.environ, **CLIENT_ENVIRONMENT}
    processes = [subprocess.Popen([*command, "--prompt", PROMPTS[index]], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment,
                                  preexec_fn=die_with_parent) for index in range(count)]
    for process in processes:
        assert process.stdout.readline().strip() == "ready"
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    results = [json.loads(process.stdout.readline()) for process in processes]
    for process in processes:
        process.wait()
    elapsed = max(result["end"] for result in results) - min(result["start"] for result in results)
    return sum(result["tokens"] for result in results) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--prompt", default=PROMPTS[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    arguments = parser.parse_args()
    if arguments.client:
        client(arguments.initial_peers, arguments.prompt, arguments.tokens)
        return
    rows = []
    for label, extra in (("steps batched only when already waiting (--batch-wait 0)", ["--batch-wait", "0"]),
                         ("waiting for other sessions' steps due soon (default)", [])):
        single, together = measure(extra, arguments.tokens)
        rows.append(f"| {label} | {single:.1f} | {together:.1f} | {together / single:.2f} |")
    print(f"| peers, 3 of 10 blocks each ({arguments.tokens} greedy tokens per client) | 1 client, tokens/s | "
          f"4 clients at once, aggregate tokens/s | ratio |")
    print("|---|---|---|---|")
    print("\n".join(rows))


def measure(extra: list[str], new_tokens: int) -> tuple[float, float]:
    with LocalSwarm(EMBEDDED_MODEL) as local:
        local.start_bootstrap()
        for span in ("0:10", "10:20", "20:30"):
            local.start_peer(span, extra=extra)
        from protocol.weights import open_model
        from swarm.client import ClientOptions, SwarmClient, SwarmView

        store = open_model(EMBEDDED_MODEL)
        probe = SwarmClient(ClientOptions(initial_peers=tuple(local.initial_peers)))
        view = SwarmView(probe, store.identity, store.num_blocks)
        local.wait_until_online(view)
        view.close()
        probe.shutdown()
        return run_clients(local.initial_peers, 1, new_tokens), run_clients(local.initial_peers, 4, new_tokens)


if __name__ == "__main__":
    main()
