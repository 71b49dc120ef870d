"""The sync loop: pods bound to the local nodes become processes, and their fate becomes pod status.

Every tick (half a second) it lists the pods of its nodes and, per pod: allocates an IP and reports
Pending; writes env, volumes and hosts file and starts the containers, reporting Running; reports
terminated with the real exit codes (Succeeded/Failed); on deletion sends SIGTERM, waits the grace
period, sends SIGKILL and removes the object with grace 0. Polling keeps it simple and robust to
apiserver restarts; half a second is nothing next to a training step.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmop_dev.runtime import envvars, hosts, ipam, paths, podstatus, probes, sandbox, volumes
from llmop_dev.runtime.api import Api, Obj
from llmop_dev.runtime.nodes import LocalNode, now
from llmop_dev.runtime.process import Container

TERMINAL = ("Succeeded", "Failed")


def log(msg: str) -> None:
    print(f"{now()} [runtime] {msg}", file=sys.stderr, flush=True)


@dataclass
class PodRun:
    pod: Obj
    ip: str
    host_ip: str
    scratch: Path
    containers: dict[str, Container] = field(default_factory=dict)
    started_at: str = ""
    finished: bool = False
    kill_at: float | None = None  # set once SIGTERM was sent for a deletion
    hosts_text: str = ""
    waiting: str = ""  # last Pending reason reported
    readiness: dict[str, probes.Readiness] = field(default_factory=dict)
    ready: bool = False  # last readiness reported

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    def exit_codes(self) -> dict[str, int | None]:
        return {name: c.exit_code() for name, c in self.containers.items()}


class Kubelet:
    def __init__(self, api: Api, nodes: list[LocalNode]) -> None:
        self.api, self.nodes = api, {n.name: n for n in nodes}
        self.ips = ipam.Allocator()
        self.runs: dict[str, PodRun] = {}
        self.shim = sandbox.build_shim()

    def lookup(self, kind: str, name: str, namespace: str) -> Obj | None:
        return self.api.get_optional(kind, name, namespace)

    # -- one tick ---------------------------------------------------------------------------------

    def sync(self) -> None:
        pods = {p["metadata"]["uid"]: p for n in self.nodes for p in self.api.pods_on_node(n)}
        for uid, pod in pods.items():
            if uid in self.runs:
                self.runs[uid].pod = pod
            else:
                self.admit(pod)
        for uid in [u for u in self.runs if u not in pods]:
            self.forget(self.runs[uid], "pod object is gone")
        self.write_hosts_files()
        for run in list(self.runs.values()):
            self.step(run)

    def admit(self, pod: Obj) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        if status.get("phase") in TERMINAL or meta.get("deletionTimestamp"):
            # Finished or deleted before we ran it (or under a previous runtime): nothing to run.
            if meta.get("deletionTimestamp"):
                self.api.delete_pod_now(pod)
            elif status.get("podIP"):
                self.ips.adopt(meta["uid"], status["podIP"])
            return
        if status.get("phase") == "Running":
            # Its processes died with a previous runtime; a pod is never restarted in place here.
            self.api.patch_pod_status(
                pod, podstatus.terminated(pod, {}, status.get("startTime", now()), "local runtime restarted")
            )
            return
        ip = self.ips.allocate(meta["uid"])
        scratch = paths.pod_dir(meta["namespace"], meta["name"], meta["uid"])
        run = PodRun(pod=pod, ip=ip, host_ip=self.nodes[pod["spec"]["nodeName"]].ip, scratch=scratch)
        self.runs[run.uid] = run
        self.report_waiting(run, "ContainerCreating")
        log(f"{run.key}: admitted on {pod['spec']['nodeName']} with IP {ip}")

    def report_waiting(self, run: PodRun, reason: str, message: str = "") -> None:
        if run.waiting != reason + message:
            run.waiting = reason + message
            self.api.patch_pod_status(
                run.pod, podstatus.pending(run.pod, run.ip, run.host_ip, reason, message)
            )

    def write_hosts_files(self) -> None:
        by_ns: dict[str, list[tuple[Obj, str]]] = {}
        for run in self.runs.values():
            by_ns.setdefault(run.pod["metadata"]["namespace"], []).append((run.pod, run.ip))
        for namespace, peers in by_ns.items():
            if any(hosts.dns_names(pod) for pod, _ in peers):
                peers.extend(self.other_runtimes_pods(namespace))
        for run in self.runs.values():
            text = hosts.render(run.pod, run.ip, by_ns[run.pod["metadata"]["namespace"]])
            if text != run.hosts_text:
                run.scratch.mkdir(parents=True, exist_ok=True)
                # Rewritten in place (same inode): the bind mount in a running pod sees the new names.
                with (run.scratch / "hosts").open("w") as f:
                    f.write(text)
                run.hosts_text = text

    def other_runtimes_pods(self, namespace: str) -> list[tuple[Obj, str]]:
        """(pod, IP) of the namespace's live pods that another runtime runs (one runtime per node, so
        that a node can be stopped alone): their IPs are in their status, written before they start."""
        found = []
        for pod in self.api.pods_in_namespace(namespace):
            status, meta = pod.get("status") or {}, pod["metadata"]
            ip = status.get("podIP")
            if (
                ip
                and meta["uid"] not in self.runs
                and pod["spec"].get("nodeName") not in self.nodes
                and status.get("phase") not in TERMINAL
                and not meta.get("deletionTimestamp")
                and ipaddress.ip_address(ip) in ipam.POD_CIDR
            ):
                found.append((pod, str(ip)))
        return found

    def step(self, run: PodRun) -> None:
        deleting = bool(run.pod["metadata"].get("deletionTimestamp"))
        codes = run.exit_codes()
        alive = any(code is None for code in codes.values())
        if deleting:
            self.stop(run, alive)
        elif not run.containers:
            self.start(run)
        elif alive and run.readiness:
            self.probe(run)
        elif not alive and not run.finished:
            run.finished = True
            final = {name: code for name, code in codes.items() if code is not None}
            messages = {name: self.termination_message(run, name) for name in final}
            self.api.patch_pod_status(
                run.pod, podstatus.terminated(run.pod, final, run.started_at, messages=messages)
            )
            log(f"{run.key}: exited {final}")

    def probe(self, run: PodRun) -> None:
        now = time.monotonic()
        for r in run.readiness.values():
            if r.due(now):
                r.observe(probes.http_ok(r.url, r.timeout), now)
        ready = all(r.ready for r in run.readiness.values())
        if ready != run.ready:
            run.ready = ready
            self.api.patch_pod_status(
                run.pod, podstatus.running(run.pod, run.ip, run.host_ip, run.started_at, ready=ready)
            )
            log(f"{run.key}: {'ready' if ready else 'not ready'}")

    def stop(self, run: PodRun, alive: bool) -> None:
        if alive and run.kill_at is None:
            meta, spec = run.pod["metadata"], run.pod["spec"]
            grace = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
            run.kill_at = time.monotonic() + float(grace)
            log(f"{run.key}: deleted; SIGTERM, {grace}s grace")
            for c in run.containers.values():
                c.terminate()
        elif alive and run.kill_at is not None and time.monotonic() >= run.kill_at:
            log(f"{run.key}: grace period over; SIGKILL")
            for c in run.containers.values():
                c.kill()
        elif not alive:
            self.api.delete_pod_now(run.pod)
            self.forget(run, "deleted")

    def forget(self, run: PodRun, why: str) -> None:
        for c in run.containers.values():
            if c.exit_code() is None:
                c.kill()
        self.ips.release(run.uid)
        shutil.rmtree(run.scratch, ignore_errors=True)
        self.runs.pop(run.uid, None)
        log(f"{run.key}: {why}; IP {run.ip} released")

    @staticmethod
    def termination_file(run: PodRun, container: str) -> Path:
        return run.scratch / "termination" / container

    def termination_message(self, run: PodRun, container: str) -> str:
        try:
            data = self.termination_file(run, container).read_bytes()
        except OSError:
            return ""
        return data[: podstatus.MESSAGE_LIMIT].decode(errors="replace")

    # -- starting containers ----------------------------------------------------------------------

    def start(self, run: PodRun) -> None:
        pod = run.pod
        # The pod IP must be in the object before fieldRefs (status.podIP) are resolved.
        pod.setdefault("status", {}).update(
            {"podIP": run.ip, "podIPs": [{"ip": run.ip}], "hostIP": run.host_ip}
        )
        try:
            vols = volumes.materialise(pod, run.scratch, self.lookup)
            prepared = [(c, envvars.resolve(pod, c, self.lookup)) for c in pod["spec"]["containers"]]
        except envvars.EnvError as exc:
            self.report_waiting(run, "CreateContainerConfigError", str(exc))
            return
        started = now()
        meta = pod["metadata"]
        for container, env in prepared:
            mounts = volumes.container_mounts(container, vols)
            mounts.append(volumes.Mount(run.scratch / "hosts", "/etc/hosts"))
            # Like the kubelet: an empty, writable file per container at terminationMessagePath.
            message = self.termination_file(run, container["name"])
            message.parent.mkdir(parents=True, exist_ok=True)
            message.write_text("")
            message.chmod(0o666)
            target = container.get("terminationMessagePath") or "/dev/termination-log"
            mounts.append(volumes.Mount(message, target))
            argv = [
                envvars.expand(a, env)
                for a in (container.get("command") or []) + (container.get("args") or [])
            ]
            full_env = {
                **sandbox.image_env(),
                "HOSTNAME": hosts.pod_hostname(pod),
                **env,
                # Runtime bookkeeping: the shim binds this IP; tools find a pod's processes by the other.
                "LLMOP_POD_IP": run.ip,
                "LLMOP_RUNTIME_POD": run.key,
            }
            if self.shim:
                full_env["LD_PRELOAD"] = str(self.shim)
            log_file = paths.log_path(meta["namespace"], meta["name"], container["name"])
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a") as f:
                # Pod names repeat across a job's attempts; this line separates one run from the next.
                f.write(f"==> pod {meta['name']} uid {run.uid} started {started} ip {run.ip}\n")
            cmd = sandbox.command(
                argv, volumes.ordered(mounts), hosts.pod_hostname(pod), container.get("workingDir") or "/"
            )
            run.containers[container["name"]] = Container(cmd, full_env, log_file)
        run.started_at = started
        run.readiness = {
            c["name"]: r for c in pod["spec"]["containers"] if (r := probes.readiness(c, run.ip)) is not None
        }
        run.ready = not run.readiness
        self.api.patch_pod_status(pod, podstatus.running(pod, run.ip, run.host_ip, started, ready=run.ready))
        log(f"{run.key}: running ({', '.join(f'{n} pid {c.pid}' for n, c in run.containers.items())})")

    # -- shutdown ---------------------------------------------------------------------------------

    def shutdown(self, grace: float = 10) -> None:
        """Stop every pod (SIGTERM, then SIGKILL) and report them Failed, like a node shutting down."""
        live = [r for r in self.runs.values() if any(c is None for c in r.exit_codes().values())]
        for run in live:
            for c in run.containers.values():
                c.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            code is None for r in live for code in r.exit_codes().values()
        ):
            time.sleep(0.2)
        for run in live:
            codes = run.exit_codes()
            for c in run.containers.values():
                if c.exit_code() is None:
                    c.kill()
            final = {n: (code if code is not None else 137) for n, code in codes.items()}
            try:
                self.api.patch_pod_status(
                    run.pod, podstatus.terminated(run.pod, final, run.started_at, "local runtime stopped")
                )
            except Exception as exc:  # the apiserver may be gone first; the processes are what matter
                log(f"{run.key}: could not report shutdown: {exc}")
