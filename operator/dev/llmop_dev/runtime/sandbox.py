"""A container as a local process tree in its own mount, UTS and PID namespaces.

``unshare --mount --uts --pid --fork --mount-proc --kill-child`` gives the process:
- its volumes bind-mounted at their mountPaths (/etc/llmop, /var/lib/llmop, /tmp, /dev/shm, ...) and
  the pod's hosts file over /etc/hosts, visible to it alone;
- the pod's hostname, which gloo resolves (via that hosts file) to the pod IP and binds;
- a PID namespace: when its first process dies the kernel kills everything left inside, and
  --kill-child kills that first process when unshare itself dies, so no process of a pod outlives it.
The bindpod LD_PRELOAD shim turns wildcard binds (torch's TCPStore) into binds to the pod IP.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from llmop_dev.runtime import paths
from llmop_dev.runtime.volumes import Mount

SHIM_SOURCE = Path(__file__).with_name("bindpod.c")


def venv_bin() -> Path:
    return Path(sys.prefix) / "bin"


def image_env() -> dict[str, str]:
    """What the trainer image's ENV provides (trainer_image/Dockerfile), with this venv as /opt/venv."""
    return {
        "PATH": f"{venv_bin()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV": sys.prefix,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "LANG": "C.UTF-8",
    }


def build_shim() -> Path | None:
    """Compile bindpod.c once per content; None (with a warning) where no C compiler exists."""
    source = SHIM_SOURCE.read_bytes()
    out = paths.root() / "lib" / f"bindpod-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if out.exists():
        return out
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("[runtime] no C compiler: wildcard listeners are not moved to pod IPs", file=sys.stderr)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"], check=True
    )
    tmp.replace(out)
    return out


# Inside the pod's private mount namespace: a tmpfs holding bind mounts of every source (and of the
# host paths the process needs) taken before any volume covers them.
STASH = "/run/llmop-sandbox"
# Host paths the container must still see, e.g. the venv and the editable install when the
# checkout lives under /tmp, which the pod's emptyDir covers.
PROJECT_ROOT = Path(__file__).resolve().parents[4]


def _covered(path: str, mounts: list[Mount]) -> bool:
    return any(path == m.target or path.startswith(m.target.rstrip("/") + "/") for m in mounts)


def _mount_lines(mounts: list[Mount], keep: list[str]) -> list[str]:
    q = shlex.quote
    lines = [f"mkdir -p {STASH} && mount -t tmpfs -o mode=700 tmpfs {STASH}"]
    # 1. Stash every source first: a later mount (an emptyDir at /tmp) may cover another's source
    #    (a claim directory under /tmp/hostpath_pv).
    for i, m in enumerate(mounts):
        if m.source is not None:
            stash = f"{STASH}/src{i}"
            make = f"mkdir -p {stash}" if m.source.is_dir() else f"touch {stash}"
            lines.append(f"{make} && mount --bind {q(str(m.source))} {stash}")
    kept = [path for path in keep if _covered(path, mounts)]
    for i, path in enumerate(kept):
        lines.append(f"mkdir -p {STASH}/keep{i} && mount --bind {q(path)} {STASH}/keep{i}")
    # 2. The volumes at their mountPaths.
    for i, m in enumerate(mounts):
        target = q(m.target)
        if m.source is None:
            lines.append(f"mkdir -p {target} && mount -t tmpfs -o mode=1777 tmpfs {target}")
            continue
        # Creating a missing mount point touches the host's filesystem (an empty directory such as
        # /etc/llmop); the content stays in the runtime's directories.
        make = f"mkdir -p {target}" if m.source.is_dir() else f"[ -e {target} ] || touch {target}"
        lines.append(f"{make} && mount --bind {STASH}/src{i} {target}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    # 3. Host paths a volume covered, put back where they were.
    for i, path in enumerate(kept):
        lines.append(f"mkdir -p {q(path)} && mount --bind {STASH}/keep{i} {q(path)}")
    return lines


def command(argv: list[str], mounts: list[Mount], hostname: str, workdir: str) -> list[str]:
    keep = sorted({str(Path(sys.prefix).resolve()), sys.prefix, str(PROJECT_ROOT), workdir})
    script = "\n".join(
        [
            "set -e",
            *_mount_lines(mounts, keep),
            f"hostname {shlex.quote(hostname)}",
            f"cd {shlex.quote(workdir)}",
            'exec "$@"',
        ]
    )
    unshare = ["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child"]
    return [*unshare, "/bin/sh", "-c", script, "pod-sandbox", *argv]
