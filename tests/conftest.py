"""Shared fixtures: the block cache, tiny random models, real local swarms, and a check that
no test leaves a process behind."""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the swarm CLI sets it for its processes

import time
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parent.parent


def _descendants(pid: int) -> list[tuple[int, str]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # zombies hold nothing
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found.append((child, command))
            stack.append(child)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphans():
    """After all tests, nothing this test run started may still be running."""
    yield
    deadline = time.monotonic() + 30
    while (left := _descendants(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind by the tests: {left}"


@pytest.fixture(scope="session")
def cache_dir() -> str:
    """One block cache for the whole run: the embedded model is converted once (~20 s)."""
    path = os.environ.get("SWARM_CACHE_DIR") or str(REPOSITORY / ".cache" / "swarm")
    os.environ["SWARM_CACHE_DIR"] = path  # peers started by the tests read the same cache
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def make_tiny_model(folder: Path, family: str = "llama", num_layers: int = 4, seed: int = 0) -> Path:
    """A small random model of a Llama-family architecture, saved as a Hugging Face folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, tie_word_embeddings=(family == "qwen2"),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


EMBEDDED = "smollm2-135m"
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue.",
]


class RunningSwarm:
    """A bootstrap and peers as real processes, plus a connected client model."""

    def __init__(self, model_name: str, spans: list[str], cache_dir: str, peer_arguments: tuple[str, ...] = ()):
        from swarm.local_swarm import LocalSwarm
        from swarm.model import DistributedModelForCausalLM

        self.local = LocalSwarm(model_name, cache_dir=cache_dir)
        try:
            self.local.start_bootstrap()
            for span in spans:
                self.local.start_peer(span, extra=peer_arguments)
            self.model = DistributedModelForCausalLM.from_pretrained(model_name, self.local.initial_peers,
                                                                     cache_dir=cache_dir)
            self.local.wait_until_online(self.model.view)
        except BaseException:
            self.local.stop(keep_logs=True)  # the error names them
            raise

    @property
    def initial_peers(self) -> list[str]:
        return self.local.initial_peers

    def close(self) -> None:
        try:
            self.model.close()
        finally:
            self.local.stop()


@pytest.fixture(scope="session")
def reference(cache_dir):
    """The embedded model loaded whole by plain transformers: what the swarm must reproduce."""
    from protocol.weights import load_full_model, open_model

    open_model(EMBEDDED, cache_dir)  # convert before any peer starts
    model, tokenizer = load_full_model(EMBEDDED)
    return model.eval(), tokenizer


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    from swarm.cli import encode_prompt

    return encode_prompt(tokenizer, prompt, chat=True)
