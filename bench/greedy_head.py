"""The greedy head's screens on the embedded model: how often each one chooses the float32
argmax, how many float32 rows it needs, and its time per token, next to the float32 head.

The hidden states are the final norm's outputs at every step of local greedy generations of
4 chat prompts (40 new tokens each, fewer where the answer ends), one row per token, one torch
thread, as a client screens them.

Run: .venv/bin/python bench/greedy_head.py   (about a minute here)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _timing import milliseconds  # noqa: E402  (bench/ is the script's folder)
from protocol.weights import EMBEDDED_MODEL, load_full_model  # noqa: E402
from swarm.cli import encode_prompt  # noqa: E402
from swarm.greedy_head import SCREENS, ScreenedArgmax  # noqa: E402

PROMPTS = ["Write a poem about the sea.", "Tell me a story about a cat.", "Explain why the sky is blue.",
           "What is the capital of France?"]


def normed_states(model, tokenizer, new_tokens: int = 40) -> torch.Tensor:
    states = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = encode_prompt(tokenizer, prompt, chat=True)
            output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_hidden_states=True,
                                    return_dict_in_generate=True)
            states += [model.model.norm(step[-1][:, -1]) for step in output.hidden_states]
    return torch.cat(states)


def main() -> None:
    print("loading the embedded model and generating locally...", file=sys.stderr)
    model, tokenizer = load_full_model(EMBEDDED_MODEL)
    model.eval()
    states = normed_states(model, tokenizer)
    weight = model.lm_head.weight.detach().float().contiguous()
    torch.set_num_threads(1)
    expected = (states @ weight.T).argmax(dim=1)
    print(f"| screen ({len(states)} tokens, one thread) | chooses the float32 argmax | handed to the float32 head "
          f"| candidates per token | ms per token |")
    print("|---|---|---|---|---|")
    for name in SCREENS:
        screen = ScreenedArgmax(screens=(name,))
        if not screen.usable(states[:1], weight):
            print(f"| {name} | cannot run here | | | |")
            continue
        chosen = [screen.argmax(states[index : index + 1], weight) for index in range(len(states))]
        handed = sum(choice is None for choice in chosen)
        equal = sum(choice is not None and choice.item() == expected[index].item()
                    for index, choice in enumerate(chosen))
        per_token = statistics.median(milliseconds(lambda row=row: screen.argmax(states[row : row + 1], weight), 20)
                                      for row in range(0, len(states), max(1, len(states) // 10)))
        print(f"| {name} | {equal} of {len(states) - handed} | {handed} | "
              f"{screen.candidates / max(screen.screened, 1):.1f} | {per_token:.2f} |")
    full = milliseconds(lambda: states[:1] @ weight.T, 100)
    print(f"| the float32 head in full | | | | {full:.2f} |")


if __name__ == "__main__":
    main()
