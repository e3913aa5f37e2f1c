"""`swarm demo`: a local swarm on loopback serving the embedded model, one chat answer, then stop."""

from __future__ import annotations

import sys
import time

from protocol.weights import EMBEDDED_MODEL, open_model
from swarm.local_swarm import LocalSwarm


def split_blocks(num_blocks: int, num_peers: int) -> list[str]:
    bounds = [round(index * num_blocks / num_peers) for index in range(num_peers + 1)]
    return [f"{start}:{end}" for start, end in zip(bounds, bounds[1:])]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo(prompt: str, num_peers: int = 3, max_new_tokens: int = 32, cache_dir: str | None = None) -> int:
    from transformers import TextStreamer

    from swarm.cli import encode_prompt, print_route
    from swarm.model import DistributedModelForCausalLM

    say(f"preparing {EMBEDDED_MODEL} (the first run converts it into the block cache, ~20 s)...")
    store = open_model(EMBEDDED_MODEL, cache_dir)
    spans = split_blocks(store.num_blocks, num_peers)
    with LocalSwarm(EMBEDDED_MODEL, cache_dir=cache_dir) as local:
        say(f"starting a bootstrap peer and {num_peers} peers on 127.0.0.1 (logs in {local.log_dir})...")
        started = time.perf_counter()
        local.start_bootstrap()
        for span in spans:
            child = local.start_peer(span)
            say(f"  peer {child.peer_id} serves blocks {span}")
        with DistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, local.initial_peers,
                                                         cache_dir=cache_dir) as model:
            local.wait_until_online(model.view)
            say(f"swarm online in {time.perf_counter() - started:.1f} s")
            tokenizer = model.tokenizer()
            input_ids = encode_prompt(tokenizer, prompt, chat=True)
            say(f"user: {prompt}")
            with model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
                print_route(session.route)
                started = time.perf_counter()
                output = model.generate(input_ids, max_new_tokens=max_new_tokens, session=session,
                                        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
                new_tokens = output.shape[1] - input_ids.shape[1]
                say(f"{new_tokens} tokens in {time.perf_counter() - started:.2f} s; stopping the swarm")
    return 0
