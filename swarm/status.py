"""`swarm status`: the map of a model's swarm, read from the DHT."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from protocol.weights import open_model
from swarm.client import ClientOptions, SwarmClient, SwarmView
from swarm.routing import coverage, format_blocks


def watch_status(model: str, initial_peers: Sequence[str], show: Callable[[dict[str, Any]], None],
                 cache_dir: str | Path | None = None, every: float | None = None) -> None:
    """Print the swarm map once, or every `every` seconds until interrupted."""
    store = open_model(model, cache_dir)
    client = SwarmClient(ClientOptions(initial_peers=tuple(initial_peers)))
    view = SwarmView(client, store.identity, store.num_blocks)
    try:
        while True:
            client.run(view.refresh(), timeout=60)
            client.run(view.measure_rtts(), timeout=60)
            show(status_report(view))
            if every is None:
                return
            time.sleep(every)
    finally:
        view.close()
        client.shutdown()


def status_report(view: SwarmView) -> dict[str, Any]:
    peers = [
        {"peer_id": record.peer_id, "start": record.start, "end": record.end, "state": record.state,
         "throughput": record.throughput, "public_name": record.public_name, "version": record.software_version,
         "protocol_version": record.protocol_version, "rtt_ms": _milliseconds(view.rtts.get(record.peer_id)),
         "cache_tokens_left": record.cache_tokens_left, "sessions_left": record.sessions_left,
         "max_session_length": record.max_session_length, "network_bandwidth": record.network_bandwidth}
        for record in sorted(view.records, key=lambda record: (record.start, record.end, record.peer_id))
    ]
    counts = coverage(view.records, view.num_blocks)
    return {"model": view.identity.name, "fingerprint": view.identity.fingerprint, "num_blocks": view.num_blocks,
            "peers": peers, "coverage": counts,
            "missing_blocks": format_blocks([block for block, count in enumerate(counts) if count == 0])}


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def format_status(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} ({report['fingerprint']}), {report['num_blocks']} blocks, "
             f"{len(report['peers'])} peers"]
    for peer in report["peers"]:
        name = f" {peer['public_name']}" if peer["public_name"] else ""
        rtt = f"{peer['rtt_ms']:.1f} ms" if peer["rtt_ms"] is not None else "unreachable"
        lines.append(f"  {peer['peer_id']}{name}  blocks {peer['start']}:{peer['end']}  {peer['state']:8}  "
                     f"{peer['throughput']:.1f} tokens/s  rtt {rtt}  v{peer['version']}")
    lines.append(f"coverage per block: {' '.join(str(count) for count in report['coverage'])}")
    gaps = report["missing_blocks"]
    lines.append(f"GAP: no online peer serves blocks {gaps}" if gaps else "every block is served")
    return "\n".join(lines)
