"""Many users at once: aggregate tokens/s of 4 clients generating together through 3 peers,
next to one client alone. Each client is its own process (as users are); the peers batch
the steps of concurrent sessions. Two swarms in one run: peers that batch only the steps that
happen to be waiting (`--batch-wait 0`), then peers with the default wait for the next steps of
other generating sessions due soon. Runs of 1 and of 4 clients alternate (`--repeats`, 3 each
by default) and the medians are printed: on a shared 2-core machine single runs move by 20%.

First, in this process, what batching costs on a peer: a generation step through 10 blocks of
the embedded model (one torch thread, 100 positions cached per session) for 1 session and for 4
sessions batched, with the weights as torch keeps them (column-major, MKL) and packed by oneDNN
(protocol.packed_linear, what peers use).

Run: .venv/bin/python bench/concurrency.py   (about 4 minutes here)
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it (see swarm/cli.py)

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import milliseconds  # noqa: E402  (bench/ is the script's folder)
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


def step_costs(repeats: int = 30) -> list[str]:
    """Rows: ms per step through blocks 0:10 for 1 and 4 sessions, and for the blocks' linear
    products alone with 1 and 4 rows of inputs, per weight layout."""
    import torch

    from peers.blocks import BlockSpan
    from protocol.packed_linear import PackedLinear
    from protocol.weights import open_model

    torch.set_num_threads(1)  # as a peer runs its batches (see --busy-threads)
    store = open_model(EMBEDDED_MODEL)
    rows = []
    for label, packed in (("dense, column-major (MKL)", False), ("packed (oneDNN)", True)):
        blocks = BlockSpan(store, 0, 10, packed=packed)
        caches = [blocks.new_cache(0, 10, 1, 512) for _ in range(4)]
        for cache in caches:
            blocks(torch.randn(1, 100, blocks.hidden_size), 0, 10, 0, cache)
        token = torch.randn(1, 1, blocks.hidden_size)

        def one() -> None:  # as a peer runs a lone session's step
            blocks.forward_many([(token, caches[0].length - 1, caches[0])], 0, 10)

        def four() -> None:
            blocks.forward_many([(token, cache.length - 1, cache) for cache in caches], 0, 10)

        linears = [module for module in blocks.modules() if isinstance(module, (torch.nn.Linear, PackedLinear))]
        rows_of = {count: {layer.in_features: torch.randn(count, layer.in_features) for layer in linears}
                   for count in (1, 4)}

        def products(count: int):
            return lambda: [layer(rows_of[count][layer.in_features]) for layer in linears]

        with torch.inference_mode():
            single, batched, products_one, products_four = (
                milliseconds(function, repeats) for function in (one, four, products(1), products(4)))
        rows.append(f"| {label} | {single:.1f} | {batched:.1f} | {batched / single:.2f} | {products_one:.1f} | "
                    f"{products_four:.1f} | {products_four / products_one:.2f} |")
    return rows


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
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    if arguments.client:
        client(arguments.initial_peers, arguments.prompt, arguments.tokens)
        return
    print("| through 10 blocks, weights | a step: 1 session, ms | 4 sessions batched, ms | ratio | "
          "the products alone: 1 row, ms | 4 rows, ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(step_costs()), flush=True)
    rows = []
    for label, extra in (("steps batched only when already waiting (--batch-wait 0)", ["--batch-wait", "0"]),
                         ("waiting for other sessions' steps due soon (default)", [])):
        single, together = measure(extra, arguments.tokens, arguments.repeats)
        rows.append(f"| {label} | {single:.1f} | {together:.1f} | {together / single:.2f} |")
    print()
    print(f"| peers, 3 of 10 blocks each ({arguments.tokens} greedy tokens per client, median of "
          f"{arguments.repeats}) | 1 client, tokens/s | 4 clients at once, aggregate tokens/s | ratio |")
    print("|---|---|---|---|")
    print("\n".join(rows))


def measure(extra: list[str], new_tokens: int, repeats: int) -> tuple[float, float]:
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
        singles, together = [], []
        for _ in range(repeats):  # alternating, so that a slow spell of the machine hits both
            singles.append(run_clients(local.initial_peers, 1, new_tokens))
            together.append(run_clients(local.initial_peers, 4, new_tokens))
        return statistics.median(singles), statistics.median(together)


if __name__ == "__main__":
    main()
