"""Failover stall: peers A (0:15), B (15:30), C (15:30); a 64-token greedy generation; the
route's 15:30 peer is SIGKILLed after 10 tokens. Prints the stall (last token before the kill
to the next) next to a typical token time, and whether the output equals an uninterrupted run.

Run: .venv/bin/python bench/failover.py
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it (see swarm/cli.py)

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.weights import EMBEDDED_MODEL  # noqa: E402
from swarm.cli import encode_prompt  # noqa: E402
from swarm.local_swarm import LocalSwarm, StopPeerAfterTokens  # noqa: E402
from swarm.model import DistributedModelForCausalLM  # noqa: E402


def run(kill: bool) -> tuple[list[int], StopPeerAfterTokens | None]:
    with LocalSwarm(EMBEDDED_MODEL) as local:
        local.start_bootstrap()
        for span in ("0:15", "15:30", "15:30"):
            local.start_peer(span)
        with DistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, local.initial_peers) as model:
            local.wait_until_online(model.view)
            ids = encode_prompt(model.tokenizer(), "Write a short poem about the sea.", chat=True)
            with model.inference_session(max_length=ids.shape[1] + 64) as session:
                stopper = StopPeerAfterTokens(local, session, tokens=10, sig=signal.SIGKILL, block=15)
                output = model.generate(ids, max_new_tokens=64, min_new_tokens=64, session=session,
                                        streamer=stopper if kill else None)
            return output[0].tolist(), stopper if kill else None


def main() -> None:
    uninterrupted, _ = run(kill=False)
    output, stopper = run(kill=True)
    print("| failover (SIGKILL of the 15:30 peer after 10 of 64 tokens) | value |")
    print("|---|---|")
    print(f"| stall: last token before the kill to the next | {stopper.stall * 1000:.0f} ms |")
    print(f"| typical token | {stopper.typical_gap * 1000:.0f} ms |")
    print(f"| output equals the uninterrupted run | {output == uninterrupted} |")


if __name__ == "__main__":
    main()
