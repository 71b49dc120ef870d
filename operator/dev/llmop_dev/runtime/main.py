"""`llmop dev runtime`: register the local nodes, then run the kubelet loop until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from types import FrameType

from llmop_dev import cluster
from llmop_dev.runtime import nodes
from llmop_dev.runtime.api import Api
from llmop_dev.runtime.kubelet import Kubelet, log

TICK_SECONDS = 0.5
LEASE_EVERY = 10.0
STATUS_EVERY = 60.0


class Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def run(kubeconfig: Path, node_count: int, first_index: int = 0) -> int:
    api = Api(kubeconfig)
    local = nodes.default_nodes(node_count, first_index)
    beat = nodes.Heartbeat(api, local, identity=f"llmop-runtime-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    if holder := beat.foreign_holder():
        log(f"another runtime ({holder}) is running for these nodes; not starting a second one")
        return 1
    beat.register()
    beat.renew_leases()
    kubelet = Kubelet(api, local)
    log(f"serving nodes {', '.join(n.name for n in local)} ({kubeconfig}); pod IPs from 127.2.0.0/16")
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    next_lease = time.monotonic() + LEASE_EVERY
    next_status = time.monotonic() + STATUS_EVERY
    try:
        while True:
            try:
                kubelet.sync()
                if time.monotonic() >= next_lease:
                    beat.renew_leases()
                    next_lease = time.monotonic() + LEASE_EVERY
                if time.monotonic() >= next_status:
                    beat.status(ready=True)
                    next_status = time.monotonic() + STATUS_EVERY
            except Stop:
                raise
            except Exception as exc:  # an apiserver hiccup must not take the node's pods down
                log(f"sync failed: {exc!r}")
            time.sleep(TICK_SECONDS)
    except Stop as stop:
        log(f"{stop}: stopping every local pod")
        # Further signals must not interrupt the orderly stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # NotReady before the pods stop, as a kubelet's graceful node shutdown does: whoever watches
        # sees the node go first, and its pods' exits as part of that, not as failures of their own.
        try:
            beat.status(ready=False, message="llmop development runtime stopped")
        except Exception as exc:
            log(f"could not mark the nodes NotReady: {exc!r}")
        kubelet.shutdown()
        try:
            beat.release_leases()
        except Exception as exc:
            log(f"could not release the nodes' leases: {exc!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmop dev runtime", description=__doc__)
    parser.add_argument(
        "--kubeconfig", type=Path, default=None, help="default: $KUBECONFIG, else the dev cluster's"
    )
    parser.add_argument("--nodes", type=int, default=2, help="number of local nodes (local-0, local-1, ...)")
    parser.add_argument(
        "--first-index",
        type=int,
        default=0,
        help="index of the first node: --nodes 1 --first-index 2 serves local-2 alone (one runtime per node)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.first_index < 0 or args.first_index + args.nodes > 254:
        parser.error("the nodes' IPs are 127.0.2.<index + 1>: need --nodes >= 1 and index + nodes <= 254")
    kubeconfig = args.kubeconfig or Path(os.environ.get("KUBECONFIG") or cluster.kubeconfig_path())
    return run(kubeconfig, args.nodes, args.first_index)


if __name__ == "__main__":
    sys.exit(main())
