"""`llmop` command line: the operator, CRD generation and the development cluster."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys

from llmop.settings import Settings


def run_operator(settings: Settings) -> int:
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
