"""What verifying peers costs: tokens/s of one client with verify_fraction 0, 0.25 and 1.

The embedded SmolLM2-135M on peers A (0:30, announced fastest), B (0:15) and C (15:30), all on
this machine: the route is A alone, and a check sends the whole prefix through B and C
(one-shot forwards).
Greedy, 32 new tokens forced; one client per setting, warmed up, then 3 rounds with the settings
interleaved (best of each), so a shared machine's changing load hits them alike.
A last run adds a liar (0:30, the hidden --corrupt-outputs test flag, announced fastest so
the route takes it) and shows that the answer stays the same.

Run: .venv/bin/python bench/verification.py
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it (see swarm/cli.py)

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.weights import EMBEDDED_MODEL  # noqa: E402
from swarm.cli import encode_prompt  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.model import DistributedModelForCausalLM  # noqa: E402

PROMPT = "Write a short poem about the sea."
NEW_TOKENS = 32
FRACTIONS = (0.0, 0.25, 1.0)
ROUNDS = 3


def client(local: LocalSwarm, fraction: float) -> DistributedModelForCausalLM:
    model = DistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, local.initial_peers, verify_fraction=fraction)
    local.wait_until_online(model.view, [child for child in local.peers if child.process.poll() is None])
    return model


def timed(model: DistributedModelForCausalLM, ids) -> tuple[float, list[int], list[str]]:
    """Tokens/s of one greedy generation, its tokens, and the route its session opened with."""
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        first_route = [peer_id for peer_id, _, _ in session.route]
        started = time.perf_counter()
        output = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, session=session)
        return NEW_TOKENS / (time.perf_counter() - started), output[0].tolist(), first_route


def main() -> None:
    with LocalSwarm(EMBEDDED_MODEL) as local:
        local.start_bootstrap()
        local.start_peer("0:30", extra=["--throughput", "100"])  # announced fast: the route is this one hop
        local.start_peer("0:15")
        local.start_peer("15:30")
        models = {fraction: client(local, fraction) for fraction in FRACTIONS}
        try:
            ids = encode_prompt(models[0.0].tokenizer(), PROMPT, chat=True)
            for model in models.values():
                model.generate(ids, max_new_tokens=8)  # warm-up
            rates = {fraction: 0.0 for fraction in FRACTIONS}
            outputs, routes = {}, {}
            for _ in range(ROUNDS):  # settings interleaved: the load of a shared machine hits them alike
                for fraction, model in models.items():
                    rate, outputs[fraction], routes[fraction] = timed(model, ids)
                    rates[fraction] = max(rates[fraction], rate)
            stats = {fraction: model.verifier.stats if model.verifier else None for fraction, model in models.items()}
        finally:
            for model in models.values():
                model.close()
        liar = local.start_peer("0:30", extra=["--throughput", "1000", "--corrupt-outputs", "1.0"], name="liar")
        with client(local, 0.25) as model:  # no warm-up: the timed run is the one that catches it
            liar_rate, liar_output, liar_route = timed(model, ids)
            liar_stats = model.verifier.stats
        assert liar_route == [liar.peer_id], "the route did not take the liar"

    print(f"| verify_fraction ({NEW_TOKENS} new tokens, a {ids.shape[1]}-token prompt, route: "
          f"{len(routes[0.0])} hop) | tokens/s | vs off | hop checks | referee forwards | liars banned "
          f"| answer equals unverified |")
    print("|---|---|---|---|---|---|---|")
    rows = [(fraction, rates[fraction], outputs[fraction], stats[fraction]) for fraction in FRACTIONS]
    rows.append(("0.25, a liar on the route (its first run)", liar_rate, liar_output, liar_stats))
    for name, rate, output, stat in rows:
        print(f"| {name} | {rate:.1f} | {rate / rates[0.0]:.2f} | {stat.checks if stat else 0} "
              f"| {stat.referee_forwards if stat else 0} | {len(stat.liars) if stat else 0} "
              f"| {output == outputs[0.0]} |")
    worst = max(stat.largest_agreeing_error for _, _, _, stat in rows if stat)
    print(f"\nlargest relative error per position between honest answers: {worst:.1e} (tolerance 1e-4)")


if __name__ == "__main__":
    main()
