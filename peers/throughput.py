"""How fast this peer is: compute throughput of its span (measured once per device and model,
then cached) and network bandwidth (a timed transfer to a peer already in the swarm)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import platform
import time
from pathlib import Path

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from peers.service import BlockService
from protocol.messages import PROBE_RPC, FrameJoiner, Probe, ProbeResult, to_frames

logger = logging.getLogger(__name__)

PROBE_BYTES = 1 << 20  # one timed transfer: large enough to see bandwidth, small enough to be quick


def device_key(fingerprint: str) -> str:
    """What a measurement depends on: the weights, the processor, the torch threads."""
    processor = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{fingerprint}|cpu|{processor}|threads={torch.get_num_threads()}"


def measure_seconds_per_block(service: BlockService, repeats: int = 3) -> float:
    """Seconds one decoding step takes per block of the span (the first step warms up)."""
    blocks = service.blocks
    cache = blocks.new_cache(blocks.start, blocks.end, 1, repeats + 1)
    hidden = torch.zeros(1, 1, blocks.hidden_size, dtype=blocks.dtype)
    service.compute_now(hidden, blocks.start, blocks.end, 0, cache)
    started = time.perf_counter()
    for position in range(1, repeats + 1):
        service.compute_now(hidden, blocks.start, blocks.end, position, cache)
    return (time.perf_counter() - started) / repeats / (blocks.end - blocks.start)


def span_throughput(service: BlockService, cache_file: Path, fingerprint: str, use_cache: bool = True) -> float:
    """Tokens/s through the whole span, from the per-block time cached for this device and model."""
    key = device_key(fingerprint)
    cached = _read(cache_file).get(key) if use_cache else None
    if cached is None:
        cached = measure_seconds_per_block(service)
        if use_cache:
            _store(cache_file, key, cached)
    else:
        logger.info(f"compute speed from the cache ({cache_file}): {cached * 1000:.2f} ms per block per token")
    return 1.0 / (cached * (service.blocks.end - service.blocks.start))


def _read(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}


def _store(cache_file: Path, key: str, seconds_per_block: float) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # peers starting together update it one at a time
        entries = _read(cache_file)
        entries[key] = seconds_per_block
        temporary = cache_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        temporary.replace(cache_file)


async def measure_bandwidth(p2p, peer_ids: list[str], timeout: float = 20.0) -> float:
    """Bytes/s of one timed transfer of PROBE_BYTES to the first of `peer_ids` that answers
    (a peer already in the swarm: no external speed test); 0.0 when none answers."""
    for peer_id in peer_ids:
        async def requests():
            for frame in to_frames(Probe(payload=bytes(PROBE_BYTES))):
                yield runtime_pb2.ExpertRequest(metadata=frame)

        try:
            started = time.perf_counter()
            replies = await p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), PROBE_RPC, requests(),
                                                         runtime_pb2.ExpertResponse)
            joiner = FrameJoiner(1 << 20)
            async def first_message():
                async for reply in replies:
                    message = joiner.push(reply.metadata)
                    if message is not None:
                        return message
            message = await asyncio.wait_for(first_message(), timeout)
            if isinstance(message, ProbeResult) and message.received == PROBE_BYTES:
                return PROBE_BYTES / (time.perf_counter() - started)
        except Exception as error:  # try the next peer
            logger.debug(f"bandwidth probe to {peer_id} failed: {error}")
    return 0.0
