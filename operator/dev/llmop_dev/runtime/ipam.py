"""Pod IPs from 127.2.0.0/16: loopback, so every connection to a pod stays on this machine.

Linux routes the whole of 127.0.0.0/8 to lo, so any of these addresses can be bound and dialled
without configuring an interface. An IP is held from the moment the pod is seen on a local node
until its object is gone, and never reused while another pod holds it.
"""

from __future__ import annotations

import ipaddress
import random

POD_CIDR = ipaddress.IPv4Network("127.2.0.0/16")


class Allocator:
    def __init__(self, cidr: ipaddress.IPv4Network = POD_CIDR, start: int | None = None) -> None:
        # x.y.z.0 and x.y.z.255 are skipped: legal on lo, but they read as network/broadcast addresses.
        self._free = [str(ip) for ip in cidr.hosts() if ip.packed[-1] not in (0, 255)]
        # A random first address: two runtimes on one machine (two clusters, e.g. two checkouts'
        # test suites) share lo, and both starting at 127.2.0.1 would hand out the same IP:port.
        self._next = random.randrange(len(self._free)) if start is None else start
        self._held: dict[str, str] = {}  # pod uid -> IP

    def get(self, uid: str) -> str | None:
        return self._held.get(uid)

    def adopt(self, uid: str, ip: str) -> None:
        """Keep the IP a pod already reports (after a runtime restart)."""
        if ipaddress.ip_address(ip) in POD_CIDR and ip not in self._held.values():
            self._held[uid] = ip

    def allocate(self, uid: str) -> str:
        if uid in self._held:
            return self._held[uid]
        held = set(self._held.values())
        # Round-robin rather than lowest-free: a just-released IP is not handed out again at once,
        # so a late connection to a deleted pod cannot reach its successor.
        for _ in range(len(self._free)):
            ip = self._free[self._next]
            self._next = (self._next + 1) % len(self._free)
            if ip not in held:
                self._held[uid] = ip
                return ip
        raise RuntimeError(f"no free pod IP left in {POD_CIDR}")

    def release(self, uid: str) -> None:
        self._held.pop(uid, None)
