"""A pod's volumes as local directories, and the bind mounts that put them at their mountPaths.

configMap and secret volumes are copied into the pod's scratch directory; emptyDir is a fresh
directory there (medium Memory: a tmpfs mounted in the pod's namespace). A persistentVolumeClaim is
one directory per claim, shared by every pod that mounts it (so workers share checkpoints as with
ReadWriteMany storage): the hostPath of the bound volume when it has one, else a cache directory.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from llmop_dev.runtime import paths
from llmop_dev.runtime.api import Obj
from llmop_dev.runtime.envvars import EnvError, Lookup


@dataclass(frozen=True)
class Mount:
    source: Path | None  # None: a new tmpfs
    target: str
    read_only: bool = False


def _write_items(dest: Path, data: dict[str, bytes], items: list[Obj] | None, mode: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    wanted = (
        [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else [(k, k, mode) for k in data]
    )
    for key, rel, file_mode in wanted:
        if key not in data:
            raise EnvError(f"key {key} not found")
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[key])
        path.chmod(file_mode)


def claim_source(claim_name: str, namespace: str, lookup: Lookup) -> Path:
    claim = lookup("pvc", claim_name, namespace)
    if claim is None:
        raise EnvError(f"persistentvolumeclaim {claim_name} not found")
    volume_name = (claim.get("spec") or {}).get("volumeName")
    volume = lookup("pv", volume_name, "") if volume_name else None
    host_path = ((volume or {}).get("spec") or {}).get("hostPath", {}).get("path")
    return Path(host_path) if host_path else paths.claim_dir(namespace, claim_name)


def materialise(pod: Obj, scratch: Path, lookup: Lookup) -> dict[str, Mount]:
    """Volume name -> where its content is on this machine (mountPath filled in per container)."""
    namespace = pod["metadata"]["namespace"]
    out: dict[str, Mount] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        here = scratch / "volumes" / name
        if "configMap" in vol or "secret" in vol:
            kind = "configmap" if "configMap" in vol else "secret"
            ref = vol.get("configMap") or vol["secret"]
            ref_name = ref.get("name") or ref.get("secretName")
            obj = lookup(kind, ref_name, namespace)
            if obj is None and not ref.get("optional"):
                raise EnvError(f"{kind} {ref_name} not found")
            raw = (obj or {}).get("data") or {}
            data = {k: base64.b64decode(v) if kind == "secret" else str(v).encode() for k, v in raw.items()}
            data.update({k: base64.b64decode(v) for k, v in ((obj or {}).get("binaryData") or {}).items()})
            _write_items(here, data, ref.get("items"), ref.get("defaultMode", 0o644))
            out[name] = Mount(here, "", read_only=True)
        elif "emptyDir" in vol:
            if (vol["emptyDir"] or {}).get("medium") == "Memory":
                out[name] = Mount(None, "")
            else:
                here.mkdir(parents=True, exist_ok=True)
                out[name] = Mount(here, "")
        elif "persistentVolumeClaim" in vol:
            ref = vol["persistentVolumeClaim"]
            source = claim_source(ref["claimName"], namespace, lookup)
            source.mkdir(parents=True, exist_ok=True)
            out[name] = Mount(source, "", read_only=bool(ref.get("readOnly")))
        elif "hostPath" in vol:
            out[name] = Mount(Path(vol["hostPath"]["path"]), "")
        else:
            raise EnvError(f"volume {name}: unsupported type {sorted(k for k in vol if k != 'name')}")
    return out


def container_mounts(container: Obj, volumes: dict[str, Mount]) -> list[Mount]:
    mounts = []
    for vm in container.get("volumeMounts") or []:
        vol = volumes[vm["name"]]
        source = vol.source / vm["subPath"] if vol.source and vm.get("subPath") else vol.source
        mounts.append(Mount(source, vm["mountPath"], read_only=vol.read_only or bool(vm.get("readOnly"))))
    return ordered(mounts)


def ordered(mounts: list[Mount]) -> list[Mount]:
    """Mount order: parents before children, and a mount that hides another's source after it.

    E.g. a claim provisioned under /tmp/hostpath_pv must be bound before the emptyDir goes over /tmp.
    """

    def hides(m: Mount, other: Mount) -> bool:
        return other is not m and other.source is not None and other.source.is_relative_to(m.target)

    return sorted(mounts, key=lambda m: (any(hides(m, o) for o in mounts), m.target.count("/"), m.target))
