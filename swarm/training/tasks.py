"""Built-in tasks for `swarm train`: small enough for a laptop, real enough to show learning.

- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), a small MLP.
- `text`: a byte-level language model on the Python documentation that ships with Python
  (`pydoc_data.topics`, ~460 KB of text), a one-layer GRU.

Every peer holds the same held-out split (fixed, independent of the run's seed); each draws its
own training batches (`swarm.training.shards`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn

from swarm.training.shards import random_batches

Batch = tuple[torch.Tensor, torch.Tensor]
_HELD_OUT_SEED = 1234  # the held-out split is the same for every peer and every run


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    build_model: Callable[[int], nn.Module]  # seed -> model
    batches: Callable[[int, int], Iterator[Batch]]  # (seed, batch size) -> endless training batches
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]  # held-out metrics, "accuracy" among them
    default_lr: float


def _classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


# ---- digits

def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(_HELD_OUT_SEED))
    held_out = len(targets) // 5
    test, train = order[:held_out], order[held_out:]
    return inputs[train], targets[train], inputs[test], targets[test]


def _digits_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _digits_batches(seed: int, batch_size: int) -> Iterator[Batch]:
    inputs, targets, _, _ = _digits()
    for indices in random_batches(len(targets), batch_size, seed):
        yield inputs[indices], targets[indices]


@torch.no_grad()
def _digits_evaluate(model: nn.Module) -> dict[str, float]:
    _, _, inputs, targets = _digits()
    logits = model(inputs)
    return {"accuracy": float((logits.argmax(-1) == targets).float().mean()),
            "loss": float(nn.functional.cross_entropy(logits, targets))}


# ---- text: next-byte prediction on Python's own documentation

_WINDOW = 64


def _text_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n".join(topics[key] for key in sorted(topics)).encode()), dtype=torch.long)
    held_out = len(data) // 20
    return data[:-held_out], data[-held_out:]


class ByteLanguageModel(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.rnn = nn.GRU(64, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def _text_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ByteLanguageModel()


def _windows(data: torch.Tensor, starts: torch.Tensor) -> Batch:
    rows = data[starts[:, None] + torch.arange(_WINDOW + 1)]
    return rows[:, :-1], rows[:, 1:]


def _text_batches(seed: int, batch_size: int) -> Iterator[Batch]:
    train, _ = _text_bytes()
    for starts in random_batches(len(train) - _WINDOW - 1, batch_size, seed):
        yield _windows(train, starts)


def _text_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))


@torch.no_grad()
def _text_evaluate(model: nn.Module) -> dict[str, float]:
    _, held_out = _text_bytes()
    inputs, targets = _windows(held_out, torch.arange(0, len(held_out) - _WINDOW - 1, 97)[:256])
    logits = model(inputs)
    loss = float(nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)))
    return {"accuracy": float((logits.argmax(-1) == targets).float().mean()), "loss": loss,
            "bits_per_byte": loss / float(torch.log(torch.tensor(2.0)))}


TASKS = {
    "digits": Task("digits", _digits_model, _digits_batches, _classification_loss, _digits_evaluate, 0.01),
    "text": Task("text", _text_model, _text_batches, _text_loss, _text_evaluate, 0.003),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
