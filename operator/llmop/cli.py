"""`llmop` command line: the operator, CRD generation and the development cluster."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys

from llmop.settings import Settings


def _without_chardet() -> None:
    """Let requests (which the kubernetes client's config loader imports) detect encodings with
    charset_normalizer, its own dependency, rather than chardet.

    requests prefers chardet when it can import it, and its tables cost the operator about 11 MB of
    memory for a guess it never makes (the apiserver labels its JSON utf-8). The operator image has no
    chardet (operator/Dockerfile); only the development environment does (a test tool's dependency),
    so this keeps the operator the same in both.
    """
    if "chardet" not in sys.modules:
        sys.modules["chardet"] = None  # type: ignore[assignment]  # an import of it raises ImportError


def _return_freed_memory(interval: float = 2.0) -> None:
    """Hand the memory freed after a burst back to the system every ``interval`` seconds.

    A burst (200 jobs and their 1600 pods at once) parses thousands of watched bodies and builds as
    many manifests, in the event loop and in 32 API threads; glibc keeps what they free in its
    per-thread heaps for reuse, where it still counts as the operator's memory, and the next burst
    takes more from the system on top. ``malloc_trim`` gives the free pages of every heap back; a few
    milliseconds each time. Only glibc has it: elsewhere (musl) this does nothing.
    """
    import ctypes
    import threading
    import time

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return

    def loop() -> None:
        while True:
            time.sleep(interval)
            trim(0)

    threading.Thread(target=loop, name="malloc-trim", daemon=True).start()


def run_operator(settings: Settings) -> int:
    _without_chardet()
    _return_freed_memory()
    import kopf
    from prometheus_client import start_http_server

    from llmop import handlers, metrics  # noqa: F401 - registers the handlers

    kopf.configure(log_format=kopf.LogFormat[settings.log_format.upper()], verbose=False)
    start_http_server(settings.metrics_port, addr=settings.bind_address, registry=metrics.REGISTRY)
    host = settings.bind_address or "0.0.0.0"
    return_code = 0
    try:
        asyncio.run(
            kopf.operator(
                standalone=True,  # one replica (the chart uses a Recreate strategy): no peering CRD needed
                clusterwide=not settings.namespaces,
                namespaces=settings.namespaces,
                liveness_endpoint=f"http://{host}:{settings.health_port}/healthz",
            )
        )
    except KeyboardInterrupt:
        return_code = 130
    return return_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("operator", help="run the operator (settings from LLMOP_* environment variables)")
    crds = sub.add_parser("crds", help="write the CRDs generated from the API models")
    crds.add_argument("out_dir", nargs="?", default="crds")
    dev = sub.add_parser("dev", help="development tools")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    cluster = dev_sub.add_parser("cluster", help="the local kwok cluster")
    cluster.add_argument("action", choices=["up", "down"])
    runtime = dev_sub.add_parser("runtime", help="run pods bound to the local nodes as local processes")
    runtime.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, else the dev cluster's")
    runtime.add_argument("--nodes", type=int, default=2, help="local nodes to serve (local-0, local-1, ...)")
    runtime.add_argument(
        "--first-index", type=int, default=0, help="index of the first node served: local-K, local-K+1, ..."
    )
    logs = sub.add_parser("logs", help="print a job's pod logs written by the development runtime")
    logs.add_argument("job")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("--tail", type=int, default=None, help="last N lines of each container")
    args = parser.parse_args(argv)

    if args.command == "operator":
        return run_operator(Settings.from_env())
    if args.command == "crds":
        from llmop_contract.api import crdgen

        return crdgen.main(["crdgen", args.out_dir])
    if args.command in ("dev", "logs") and importlib.util.find_spec("llmop_dev") is None:
        # The operator image installs only the operator and the contract (operator/Dockerfile).
        print(
            "llmop: the development tools (llmop-dev, operator/dev) are not installed here", file=sys.stderr
        )
        return 2
    if args.command == "dev" and args.dev_command == "cluster":
        from llmop_dev import cluster as devcluster

        return devcluster.main(["cluster", args.action])
    if args.command == "dev" and args.dev_command == "runtime":
        from llmop_dev.runtime import main as devruntime

        return devruntime.main(
            [
                *(["--kubeconfig", args.kubeconfig] if args.kubeconfig else []),
                *("--nodes", str(args.nodes), "--first-index", str(args.first_index)),
            ]
        )
    if args.command == "logs":
        from llmop_dev.runtime import logs as joblogs

        return joblogs.main(args.job, args.namespace, args.tail)
    return 2


if __name__ == "__main__":
    sys.exit(main())
