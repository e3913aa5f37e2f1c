"""The `swarm` command. Results go to stdout; diagnostics and logs go to stderr."""

from __future__ import annotations

import os

# Before torch loads libgomp: OpenMP workers of an idle process spin for GOMP's default 300,000
# rounds (several ms) after each parallel region, stealing the core the next peer on the route
# needs. 30,000 keeps a busy process's own barriers fast (measured: 2-peer step 40 -> 34 ms).
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import argparse
import json
import logging
import sys
from typing import Sequence

from protocol.network import NetworkOptions

logger = logging.getLogger("swarm")


def _network_arguments(parser: argparse.ArgumentParser, client: bool = False) -> None:
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of peers already in the swarm (what `swarm dht` printed)")
    if client:
        return
    parser.add_argument("--host-maddrs", nargs="*", default=["/ip4/127.0.0.1/tcp/0"], metavar="MADDR",
                        help="where to listen (default: loopback only; /ip4/0.0.0.0/tcp/PORT for others to reach you)")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="addresses others should dial (behind NAT or in containers)")
    parser.add_argument("--identity", metavar="FILE", help="private key file: keeps the peer id across restarts")
    parser.add_argument("--nat-port-map", action="store_true",
                        help="ask the LAN gateway for a port mapping (UPnP/NAT-PMP); off by default")


def _network(arguments: argparse.Namespace) -> NetworkOptions:
    return NetworkOptions(host_maddrs=tuple(arguments.host_maddrs), announce_maddrs=tuple(arguments.announce_maddrs),
                          identity_path=arguments.identity, nat_port_map=arguments.nat_port_map)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Run and use language models served by a swarm of peers.")
    parser.add_argument("--log-level", default=os.environ.get("SWARM_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", help="run a bootstrap peer; prints its multiaddrs")
    _network_arguments(dht)

    peer = commands.add_parser("peer", help="serve a span of a model's blocks")
    peer.add_argument("model", help="smollm2-135m, a .gguf file, or a local Hugging Face folder")
    peer.add_argument("--blocks", metavar="A:B", help="serve blocks A..B-1 (default: all)")
    peer.add_argument("--cache-dir", help="block cache folder (default: ~/.cache/swarm or $SWARM_CACHE_DIR)")
    peer.add_argument("--throughput", type=float, help="announce this many tokens/s instead of measuring")
    peer.add_argument("--public-name", default="", help="a name shown in `swarm status`")
    peer.add_argument("--announce-period", type=float, default=15.0, help="seconds between DHT announcements")
    peer.add_argument("--record-expiry", type=float, default=45.0, help="seconds a record lives unless renewed")
    peer.add_argument("--num-blocks", type=int, help="serve this many blocks where the swarm is weakest")
    peer.add_argument("--rebalance-period", type=float, default=60.0,
                      help="without --blocks: seconds between checks whether moving would help the swarm (0: never)")
    peer.add_argument("--drain-timeout", type=float, default=60.0,
                      help="when moving, how long open sessions may finish before they continue elsewhere")
    peer.add_argument("--max-sessions", type=int, default=64, help="concurrent inference sessions")
    peer.add_argument("--max-session-length", type=int, default=8192, help="tokens per session")
    peer.add_argument("--attention-cache-mib", type=int, default=2048,
                      help="attention cache memory across all sessions")
    peer.add_argument("--session-timeout", type=float, default=300.0,
                      help="free a session whose client has sent nothing for this many seconds")
    peer.add_argument("--busy-threads", type=int, default=0,
                      help="torch threads while several sessions generate (default: 1 on machines with 2 cores "
                           "or fewer, where spinning workers starve the network side; all otherwise)")
    peer.add_argument("--batch-wait", type=float,
                      help="seconds a step may wait for other generating sessions' steps to run them as one batch "
                           "(default: twice the time one step takes on this peer; 0: never wait)")
    peer.add_argument("--compute-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slow peer
    peer.add_argument("--link-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # benches: a distant peer
    # tests: a lying peer: noise of this size (relative to each position's RMS) on every output after the first N
    peer.add_argument("--corrupt-outputs", type=float, default=0.0, help=argparse.SUPPRESS)
    peer.add_argument("--corrupt-after", type=int, default=0, help=argparse.SUPPRESS)
    _network_arguments(peer)

    generate = commands.add_parser("generate", help="generate text through the swarm (streams to stdout)")
    generate.add_argument("model")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.add_argument("--temperature", type=float, help="sample at this temperature (0 or none: greedy)")
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--verbose", action="store_true", help="print the route on stderr")
    generate.add_argument("--verify", type=float, default=0.0, metavar="FRACTION",
                          help="check each peer's first step, then this share of its steps, against another peer "
                               "(or the client's own recomputation); liars are banned and their steps redone")
    generate.add_argument("--cache-dir")
    _network_arguments(generate, client=True)

    status = commands.add_parser("status", help="show the swarm map of a model")
    status.add_argument("model")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 5) until Ctrl-C")
    status.add_argument("--cache-dir")
    _network_arguments(status, client=True)

    train = commands.add_parser("train", help="train a built-in task together with other peers (decentralized averaging)")
    train.add_argument("task", help="digits (8x8 handwritten digits, an MLP) or text (a byte-level LM on pydoc text)")
    train.add_argument("--run-id", required=True, help="peers with the same run id train one model together")
    train.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    train.add_argument("--batch-size", type=int, default=32, help="this peer's batch per local step")
    train.add_argument("--checkpoint-dir", help="save the state here and resume from it on restart")
    train.add_argument("--checkpoint-every", type=int, default=20, help="global steps between checkpoints")
    train.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    settings = train.add_argument_group("run settings (the first peer's win: later peers adopt them from the DHT)")
    settings.add_argument("--seed", type=int, default=0)
    settings.add_argument("--steps", type=int, default=60, help="global steps; every peer stops after the last")
    settings.add_argument("--target-batch-size", type=int, default=256,
                          help="samples the swarm gathers for one global step")
    settings.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    settings.add_argument("--aggregator", default="mean",
                          help="how a group combines its gradients: mean, median, trimmed_mean, centered_clip, krum")
    settings.add_argument("--num-byzantine", type=int, default=0, help="liars the robust aggregators tolerate")
    settings.add_argument("--worker-momentum", type=float,
                          help="each peer sends its own running average of gradients (0 to 1; default 0.9 with a "
                               "robust --aggregator and no --coding, else 0): robust rules then lose far less")
    settings.add_argument("--coding", choices=["fractional", "cyclic"],
                          help="global steps as coded rounds that do not wait for --stragglers slow peers")
    settings.add_argument("--stragglers", type=int, default=1, help="with --coding: slow peers a step does not wait for")
    train.add_argument("--verify-fraction", type=float, default=1.0,
                       help="chance to check each reducer's part of a round before applying it (0: trust reducers)")
    train.add_argument("--die-in-round", type=int, default=0, help=argparse.SUPPRESS)  # tests: killed mid-round
    train.add_argument("--lie-as-reducer", action="store_true", help=argparse.SUPPRESS)  # tests: a Byzantine reducer
    train.add_argument("--straggle", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slow peer
    _network_arguments(train)

    demo = commands.add_parser("demo", help="start a local swarm on loopback, chat through it, stop it")
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--peers", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--cache-dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=arguments.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("hivemind", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _COMMANDS[arguments.command](arguments)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a clear line instead of a traceback; --log-level DEBUG shows it
        logger.debug("failed", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 1


def _dht(arguments: argparse.Namespace) -> int:
    from peers.bootstrap import run_bootstrap

    return run_bootstrap(_network(arguments), tuple(arguments.initial_peers))


def _peer(arguments: argparse.Namespace) -> int:
    from peers.server import AnnounceOptions, PeerOptions, parse_blocks, run_peer
    from peers.service import ServingLimits

    if arguments.blocks and arguments.num_blocks:
        raise ValueError("give either --blocks A:B or --num-blocks N, not both")
    options = PeerOptions(
        model=arguments.model, blocks=parse_blocks(arguments.blocks) if arguments.blocks else None,
        num_blocks=arguments.num_blocks,
        initial_peers=tuple(arguments.initial_peers), network=_network(arguments), cache_dir=arguments.cache_dir,
        announce=AnnounceOptions(period=arguments.announce_period, expiry=arguments.record_expiry,
                                 public_name=arguments.public_name, rebalance_period=arguments.rebalance_period,
                                 drain_timeout=arguments.drain_timeout),
        limits=ServingLimits(max_sessions=arguments.max_sessions, max_session_length=arguments.max_session_length,
                             cache_bytes=arguments.attention_cache_mib * 1024**2,
                             session_idle_timeout=arguments.session_timeout, compute_delay=arguments.compute_delay,
                             link_delay=arguments.link_delay,
                             corrupt_outputs=arguments.corrupt_outputs, corrupt_after=arguments.corrupt_after,
                             batch_wait=arguments.batch_wait,
                             **({"busy_threads": arguments.busy_threads} if arguments.busy_threads else {})),
        throughput=arguments.throughput,
    )
    return run_peer(options)


def _generate(arguments: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from swarm.model import DistributedModelForCausalLM

    if arguments.seed is not None:
        torch.manual_seed(arguments.seed)
    with DistributedModelForCausalLM.from_pretrained(arguments.model, arguments.initial_peers,
                                                     cache_dir=arguments.cache_dir,
                                                     verify_fraction=arguments.verify) as model:
        tokenizer = model.tokenizer()
        input_ids = encode_prompt(tokenizer, arguments.prompt, arguments.chat)
        sampling = {}
        if arguments.temperature:
            sampling = dict(do_sample=True, temperature=arguments.temperature)
            if arguments.top_p is not None:
                sampling["top_p"] = arguments.top_p
            if arguments.top_k is not None:
                sampling["top_k"] = arguments.top_k
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with model.inference_session(max_length=input_ids.shape[1] + arguments.max_new_tokens) as session:
            if arguments.verbose:
                print_route(session.route)
            first_route = session.route
            model.generate(input_ids, max_new_tokens=arguments.max_new_tokens, session=session, streamer=streamer,
                           **sampling)
            if arguments.verbose and session.route != first_route:  # a peer failed or was caught lying
                print_route(session.route)
    return 0


def encode_prompt(tokenizer, prompt: str, chat: bool):
    if chat:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def print_route(route) -> None:
    hops = " -> ".join(f"{peer_id[-8:]}[{start}:{end}]" for peer_id, start, end in route)
    print(f"route: {hops}", file=sys.stderr, flush=True)


def _status(arguments: argparse.Namespace) -> int:
    from swarm.status import format_status, watch_status

    def show(report) -> None:
        print(json.dumps(report) if arguments.json else format_status(report) + "\n", flush=True)

    watch_status(arguments.model, arguments.initial_peers, show, cache_dir=arguments.cache_dir,
                 every=arguments.watch)
    return 0


def _train(arguments: argparse.Namespace) -> int:
    import time

    from swarm.robust import get_aggregator
    from swarm.training.run import RunSettings, TrainOptions, run_training

    from swarm.training.accountability import AccountabilityOptions

    get_aggregator(arguments.aggregator)  # an unknown rule fails before any network start
    if not 0.0 <= arguments.verify_fraction <= 1.0:
        raise ValueError("--verify-fraction must be between 0 and 1")
    for name in ("steps", "target_batch_size", "batch_size", "checkpoint_every"):
        if getattr(arguments, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    worker_momentum = arguments.worker_momentum
    if worker_momentum is None:
        worker_momentum = 0.9 if arguments.aggregator != "mean" and not arguments.coding else 0.0
    if not 0.0 <= worker_momentum < 1.0:
        raise ValueError("--worker-momentum must be at least 0 and below 1")
    if worker_momentum and arguments.coding:
        raise ValueError("--worker-momentum needs each peer's own gradients, --coding sums them across peers: "
                         "pass --worker-momentum 0 or drop --coding")
    proposed = RunSettings(task=arguments.task, seed=arguments.seed, steps=arguments.steps,
                           target_batch_size=arguments.target_batch_size, lr=arguments.lr,
                           aggregator=arguments.aggregator, num_byzantine=arguments.num_byzantine,
                           worker_momentum=worker_momentum, coding=arguments.coding or "", stragglers=arguments.stragglers if arguments.coding else 0,
                           proposed_at=time.time())
    result = run_training(TrainOptions(
        run_id=arguments.run_id, initial_peers=tuple(arguments.initial_peers), proposed=proposed,
        batch_size=arguments.batch_size, network=_network(arguments), checkpoint_dir=arguments.checkpoint_dir,
        checkpoint_every=arguments.checkpoint_every, progress=not arguments.no_progress,
        accountability=AccountabilityOptions(verify_fraction=arguments.verify_fraction)
        if arguments.verify_fraction > 0 else None,
        die_in_round=arguments.die_in_round, lie_as_reducer=arguments.lie_as_reducer, straggle=arguments.straggle))
    if arguments.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"{result['task']}: {result['steps']} steps, held-out accuracy {result['accuracy']:.4f}, "
              f"loss {result['loss']:.4f}, parameters fingerprint {result['params_fingerprint']:.10g}", flush=True)
    return 0


def _demo(arguments: argparse.Namespace) -> int:
    from swarm.demo import run_demo

    return run_demo(prompt=arguments.prompt, num_peers=arguments.peers, max_new_tokens=arguments.max_new_tokens,
                    cache_dir=arguments.cache_dir)


_COMMANDS = {"dht": _dht, "peer": _peer, "generate": _generate, "status": _status, "train": _train, "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
