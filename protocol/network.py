"""How every swarm process starts its libp2p daemon: one place for the network defaults.

The only I/O in `protocol/`: peers and clients must start P2P identically (same transport
options, same message cap), so the helper lives here rather than twice.
- NAT port mapping (UPnP/NAT-PMP probes of the LAN gateway) is off unless asked for.
- p2pd is tied to the process that starts it (PR_SET_PDEATHSIG), so a SIGKILLed peer or
  client leaves no daemon behind holding its port and identity.
- The start-up timeout is generous: 15 s fails on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import signal
import sys
from typing import Sequence

from hivemind.p2p import P2P, P2PDaemonError

STARTUP_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class NetworkOptions:
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None
    nat_port_map: bool = False
    client_mode: bool = False


def die_with_parent() -> None:
    """preexec_fn for children: the kernel sends SIGTERM to them when their parent dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def _children_die_with_us():
    # hivemind starts p2pd with asyncio.subprocess.create_subprocess_exec and offers no hook;
    # wrapping it for the duration of P2P.create is the narrowest place to add preexec_fn.
    original = asyncio.subprocess.create_subprocess_exec

    async def create_subprocess_exec(*args, **kwargs):
        kwargs.setdefault("preexec_fn", die_with_parent)
        return await original(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec
    try:
        yield
    finally:
        asyncio.subprocess.create_subprocess_exec = original


class UnreachablePeersError(ConnectionError):
    pass


async def start_p2p(options: NetworkOptions, initial_peers: Sequence[str] = ()) -> P2P:
    try:
        with _children_die_with_us():
            return await _create_p2p(options, initial_peers)
    except P2PDaemonError as error:
        if "bootstrap" in str(error):
            raise UnreachablePeersError(
                f"could not reach any initial peer ({' '.join(initial_peers)}): check the addresses "
                f"and that `swarm dht` or a peer is running there") from None
        raise


async def _create_p2p(options: NetworkOptions, initial_peers: Sequence[str]) -> P2P:
    return await P2P.create(
        initial_peers=list(initial_peers) or None,
        host_maddrs=list(options.host_maddrs),
        announce_maddrs=list(options.announce_maddrs) or None,
        identity_path=options.identity_path,
        nat_port_map=options.nat_port_map,
        dht_mode="client" if options.client_mode else "server",
        startup_timeout=STARTUP_TIMEOUT,
        # the identity check starts a second daemon per start; a restarted peer reclaims its own
        check_if_identity_free=False,
    )
