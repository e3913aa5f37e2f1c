"""Prompt tuning through the swarm: teach SmolLM2-135M to start every answer with "Ahoy!"
by training only a soft prompt on the client; the blocks stay frozen on 2 peers, and the
gradient comes back through them. Prints the loss per step and an answer before and after.

Run: .venv/bin/python bench/prompt_tuning.py [--steps 30]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it (see swarm/cli.py)

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.weights import EMBEDDED_MODEL  # noqa: E402
from swarm.cli import encode_prompt  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.model import DistributedModelForCausalLM  # noqa: E402

EXAMPLES = [
    ("What is the capital of France?", "Ahoy! The capital of France is Paris."),
    ("How many legs does a spider have?", "Ahoy! A spider has eight legs."),
    ("What color is the sky?", "Ahoy! The sky is blue."),
    ("Who wrote Hamlet?", "Ahoy! Hamlet was written by William Shakespeare."),
]


def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted question + answer; the loss covers the answer tokens only."""
    rows, labels = [], []
    for question, answer in EXAMPLES:
        prompt = encode_prompt(tokenizer, question, chat=True)[0]
        reply = tokenizer(answer + "<|im_end|>", return_tensors="pt")["input_ids"][0]
        rows.append(torch.cat([prompt, reply]))
        labels.append(torch.cat([torch.full_like(prompt, -100), reply]))
    length = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id or 0  # right padding: causal attention never looks at it, labels ignore it
    input_ids = torch.stack([torch.cat([row, torch.full((length - len(row),), pad)]) for row in rows])
    label_ids = torch.stack([torch.cat([row, torch.full((length - len(row),), -100)]) for row in labels])
    return input_ids, label_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    arguments = parser.parse_args()
    with LocalSwarm(EMBEDDED_MODEL) as local:
        local.start_bootstrap()
        for span in ("0:15", "15:30"):
            local.start_peer(span)
        with DistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, local.initial_peers) as model:
            local.wait_until_online(model.view)
            tokenizer = model.tokenizer()
            model.requires_grad_(False)  # only the soft prompt learns
            prompt = model.enable_prompt_tuning(arguments.prompt_tokens)
            optimizer = torch.optim.Adam([prompt], lr=0.02)
            input_ids, labels = batch(tokenizer)
            question = encode_prompt(tokenizer, "What is the largest ocean?", chat=True)
            before_prompt = model.prompt_embeddings
            model.prompt_embeddings = None
            before = model.generate(question, max_new_tokens=12)
            model.prompt_embeddings = before_prompt
            started = time.perf_counter()
            print("| step | loss | seconds |")
            print("|---|---|---|")
            for step in range(1, arguments.steps + 1):
                optimizer.zero_grad()
                loss = model(input_ids, labels=labels).loss
                loss.backward()
                optimizer.step()
                if step == 1 or step % 5 == 0:
                    print(f"| {step} | {loss.item():.3f} | {time.perf_counter() - started:.0f} |", flush=True)
            after = model.generate(question, max_new_tokens=12)
            decode = lambda ids: tokenizer.decode(ids[0, question.shape[1]:], skip_special_tokens=True)  # noqa: E731
            print(f"\nbefore: {decode(before)!r}\nafter:  {decode(after)!r}")


if __name__ == "__main__":
    main()
