"""`swarm status`: the map of a model's swarm, read from the DHT."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from protocol.weights import open_model
from swarm.client import ClientOptions, SwarmClient
from swarm.routing import coverage, format_blocks


def swarm_status(model: str, initial_peers: Sequence[str], cache_dir: str | Path | None = None) -> dict[str, Any]:
    store = open_model(model, cache_dir)
    client = SwarmClient(ClientOptions(initial_peers=tuple(initial_peers)))
    try:
        records = client.run(client.fetch_records(store.identity), timeout=60)
    finally:
        client.shutdown()
    peers = [
        {"peer_id": record.peer_id, "start": record.start, "end": record.end, "state": record.state,
         "throughput": record.throughput, "public_name": record.public_name, "version": record.software_version,
         "cache_tokens_left": record.cache_tokens_left, "sessions_left": record.sessions_left,
         "max_session_length": record.max_session_length, "protocol_version": record.protocol_version}
        for record in sorted(records, key=lambda record: (record.start, record.end, record.peer_id))
    ]
    return {"model": store.identity.name, "fingerprint": store.identity.fingerprint,
            "num_blocks": store.num_blocks, "peers": peers, "coverage": coverage(records, store.num_blocks)}


def format_status(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} ({report['fingerprint']}), {report['num_blocks']} blocks, "
             f"{len(report['peers'])} peers"]
    for peer in report["peers"]:
        name = f" {peer['public_name']}" if peer["public_name"] else ""
        lines.append(f"  {peer['peer_id']}{name}  blocks {peer['start']}:{peer['end']}  {peer['state']:8}  "
                     f"{peer['throughput']:.1f} tokens/s")
    gaps = [block for block, count in enumerate(report["coverage"]) if count == 0]
    lines.append(f"coverage per block: {' '.join(str(count) for count in report['coverage'])}")
    lines.append(f"missing blocks: {format_blocks(gaps)}" if gaps else "every block is served")
    return "\n".join(lines)
