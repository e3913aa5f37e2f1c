"""A swarm of real `swarm` processes on loopback: a bootstrap and peers, started and stopped together.

Used by `swarm demo`, the integration tests and the benchmarks. Every child dies with us
(PR_SET_PDEATHSIG), and `stop()` ends them with SIGTERM, then SIGKILL if they linger.
Readiness is polled from the DHT, never guessed with a sleep.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from protocol.network import die_with_parent

REPOSITORY = Path(__file__).resolve().parent.parent


class LocalSwarmError(RuntimeError):
    pass


@dataclasses.dataclass
class LocalProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    peer_id: str = ""
    addresses: tuple[str, ...] = ()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def swarm_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli", *arguments]


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    environment = {**os.environ, **(extra or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    return environment


class LocalSwarm:
    def __init__(self, model: str, log_dir: str | Path | None = None, cache_dir: str | None = None,
                 environment: dict[str, str] | None = None, start_timeout: float = 180.0):
        self.model, self.cache_dir, self.start_timeout = model, cache_dir, start_timeout
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="swarm-logs-"))
        self._own_log_dir = log_dir is None  # a temporary folder: removed at a clean stop
        self.environment = environment
        self.bootstrap: LocalProcess | None = None
        self.peers: list[LocalProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return list(self.bootstrap.addresses)

    def _spawn(self, name: str, arguments: Sequence[str], environment: dict[str, str] | None = None) -> LocalProcess:
        log_path = self.log_dir / f"{name}.log"
        process = subprocess.Popen(swarm_command(*arguments), stdout=subprocess.PIPE, stderr=open(log_path, "wb"),
                                   stdin=subprocess.DEVNULL, text=True, preexec_fn=die_with_parent,
                                   env=_environment({**(self.environment or {}), **(environment or {})}))
        return LocalProcess(name, process, log_path)

    def _read_line(self, child: LocalProcess) -> str:
        line = child.process.stdout.readline()
        if not line:
            raise LocalSwarmError(f"{child.name} exited with {child.process.wait()} before it was ready:\n"
                                  f"{child.log_tail()}")
        return line.strip()

    def start_bootstrap(self) -> LocalProcess:
        self.bootstrap = self._spawn("dht", ["dht"])
        self.bootstrap.addresses = (self._read_line(self.bootstrap),)
        return self.bootstrap

    def start_peer(self, blocks: str | None = None, extra: Sequence[str] = (), name: str | None = None,
                   environment: dict[str, str] | None = None) -> LocalProcess:
        arguments = ["peer", self.model, "--initial-peers", *self.initial_peers, *extra]
        if blocks is not None:
            arguments += ["--blocks", blocks]
        if self.cache_dir is not None:
            arguments += ["--cache-dir", self.cache_dir]
        child = self._spawn(name or f"peer{len(self.peers)}", arguments, environment)
        self.peers.append(child)
        first = self._read_line(child)
        if not first.startswith("peer id "):
            raise LocalSwarmError(f"{child.name} printed {first!r} instead of its peer id")
        child.peer_id = first.removeprefix("peer id ")
        return child

    def start_trainer(self, task: str, run_id: str, extra: Sequence[str] = (), name: str | None = None
                      ) -> LocalProcess:
        """One `swarm train` peer; its stdout's last line is the JSON result (see `trainer_result`)."""
        arguments = ["train", task, "--run-id", run_id, "--json", "--no-progress",
                     "--initial-peers", *self.initial_peers, *extra]
        child = self._spawn(name or f"trainer{len(self.peers)}", arguments)
        self.peers.append(child)
        return child

    @staticmethod
    def trainer_result(child: LocalProcess, timeout: float = 600.0) -> dict:
        import json

        output, _ = child.process.communicate(timeout=timeout)
        if child.process.returncode != 0:
            raise LocalSwarmError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        return json.loads(output.strip().splitlines()[-1])

    def wait_until_online(self, client_view, peers: Sequence[LocalProcess] | None = None) -> None:
        """Poll the DHT through a client's SwarmView until the given peers are online."""
        wanted = {child.peer_id for child in (peers if peers is not None else self.peers)}
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for child in self.peers:
                if child.peer_id in wanted and child.process.poll() is not None:
                    raise LocalSwarmError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
            records = client_view.client.run(client_view.refresh())
            if wanted <= {record.peer_id for record in records if record.state == "online"}:
                return
            time.sleep(0.25)
        raise LocalSwarmError(f"peers were not online within {self.start_timeout} s; logs in {self.log_dir}")

    def stop_peer(self, child: LocalProcess, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if child.process.poll() is None:
            child.process.send_signal(sig)
            try:
                child.process.wait(timeout)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if child.process.stdout:
            child.process.stdout.close()
        return child.process.returncode

    def stop(self, keep_logs: bool = False) -> None:
        """Stop every process; a temporary log folder goes too, unless `keep_logs`."""
        children = [*self.peers, *([self.bootstrap] if self.bootstrap else [])]
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            self.stop_peer(child)
        if self._own_log_dir and not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.stop(keep_logs=exc_type is not None)  # after a failure the logs tell what happened
        if exc_type is not None and self._own_log_dir:
            print(f"the swarm's logs are kept in {self.log_dir}", file=sys.stderr)


class StopPeerAfterTokens:
    """A generate() streamer that stops a peer of the route after `tokens` new tokens and
    records when each token arrived (to measure the stall a failover costs)."""

    def __init__(self, local: LocalSwarm, session, tokens: int, sig: int = signal.SIGKILL, block: int | None = None):
        self.local, self.session, self.tokens, self.sig, self.block = local, session, tokens, sig, block
        self.arrivals: list[float] = []
        self.stopped_peer: str | None = None
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        self.arrivals.append(time.perf_counter())
        if len(self.arrivals) == self.tokens:
            block = self.block if self.block is not None else self.session.route[-1][1]
            peer_id = next(peer for peer, start, end in self.session.route if start <= block < end)
            child = next(child for child in self.local.peers if child.peer_id == peer_id)
            child.process.send_signal(self.sig)
            self.stopped_peer = peer_id

    def end(self) -> None:
        pass

    @property
    def stall(self) -> float:
        """Seconds between the token before the stop and the one after it."""
        return self.arrivals[self.tokens] - self.arrivals[self.tokens - 1]

    @property
    def typical_gap(self) -> float:
        gaps = sorted(later - earlier for earlier, later in zip(self.arrivals, self.arrivals[1:]))
        return gaps[len(gaps) // 2]
