"""Atomic, resumable checkpoints.

Layout under paths.checkpointDir::

    step-00000100/            one complete checkpoint (DeepSpeed model/optimiser states, ZeRO partitions)
        mp_rank_00_model_states.pt ... zero_pp_rank_*_optim_states.pt
        rng-rank00000.pt       python/numpy/torch RNG state of each rank
        llmtrain-checkpoint.json   size and sha256 of every file above, written last (integrity.py)
    latest                    text file naming the newest committed checkpoint ("step-00000100")
    .tmp-step-00000200/       a checkpoint being written (deleted at start-up if a crash left one)
    rejected-step-00000300/   a checkpoint that failed verification at a resume, kept for inspection

Every rank writes its shards into the ``.tmp-`` directory; after a barrier rank 0 hashes them into the
manifest, renames the directory into place and only then rewrites ``latest`` (write-to-temp +
os.replace). That covers a crash during the save, but not a file damaged afterwards (a full disk that
the save did not notice, storage that lost writes, a file truncated by hand), and neither our
``latest`` nor DeepSpeed's says anything about completeness. So a resume trusts no pointer: rank 0
verifies the ``step-*`` directories newest first against their manifests, takes the first that
verifies, logs one WARNING line per rejected one and renames it ``rejected-<tag>`` (never deleted: a
person decides; renamed so that keep-last rotation counts only good checkpoints, a re-save of the same
step does not overwrite it, and the next retry does not hash it again), then broadcasts its choice so
every rank loads the same tag. This needs the checkpoint directory on storage shared by all ranks,
which the commit by rename already does.

With ``spec.storage.remote`` (remote.py) every committed checkpoint is also queued for upload, and
keep-last rotation skips a checkpoint still waiting for it. When no checkpoint on the volume verifies,
rank 0 restores the newest complete remote one (or ``training.checkpointing.resumeFrom``) onto the
volume first, through ``.tmp-<tag>`` and a rename like a save, and the resume goes on as above.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmtrain.config import ConfigError
from llmtrain.logs import Logger
from llmtrain.train import integrity
from llmtrain.train.dist import DistEnv, barrier, broadcast_from_main
from llmtrain.train.integrity import Rejection
from llmtrain.train.remote import Remote

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry

    from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig

LATEST = "latest"
TMP_PREFIX = ".tmp-"
TAG_PREFIX = "step-"
REJECTED_PREFIX = "rejected-"
UNIVERSAL_PREFIX = "universal-"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int | None:
    number = tag.removeprefix(TAG_PREFIX)
    return int(number) if tag.startswith(TAG_PREFIX) and number.isdigit() else None


def candidates(root: Path) -> list[Path]:
    """The committed checkpoint directories, newest (highest step) first."""
    found = [(step_of(p.name), p) for p in root.glob(TAG_PREFIX + "*") if p.is_dir()]
    return [p for step, p in sorted(((s, p) for s, p in found if s is not None), reverse=True)]


def select(root: Path) -> tuple[str | None, list[Rejection]]:
    """The newest checkpoint whose manifest verifies (None if none does), and those rejected before it."""
    rejected: list[Rejection] = []
    for directory in candidates(root):
        problem = integrity.verify(directory)
        if problem is None:
            return directory.name, rejected
        rejected.append(problem)
    return None, rejected


def set_aside(directory: Path) -> Path:
    """Rename a rejected checkpoint out of the ``step-*`` namespace; returns where it now is."""
    target = directory.with_name(REJECTED_PREFIX + directory.name)
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{REJECTED_PREFIX}{directory.name}.{n}")
    os.rename(directory, target)
    return target


def saved_partitions(directory: Path) -> int | None:
    """How many data-parallel ranks wrote a checkpoint's ZeRO partitions; None at ZeRO-0 (unpartitioned).

    DeepSpeed names one optimiser partition per data-parallel rank and model-parallel rank
    (``[bf16_]zero_pp_rank_<r>_mp_rank_<m>_optim_states.pt``), at every ZeRO stage, so the count for
    model-parallel rank 0 is the world the partitions are cut for (every rank's under pure data
    parallel, the replicas' under tensor or pipeline parallel).
    """
    return len(list(directory.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def saved_mesh(directory: Path) -> tuple[int, int]:
    """(tensor, pipeline) sizes a checkpoint was written under. DeepSpeed writes one
    ``mp_rank_<r>_model_states.pt`` per model-parallel rank: per tensor rank under AutoTP, per stage
    under pipeline parallel and per (stage, tensor rank) under both. Pipeline checkpoints also hold
    one file per layer, ``layer_<i>-model_states.pt``, or with tensor parallel one per layer and tensor
    rank, ``layer_<i>-model_<t>-model_states.pt`` (the topology's rank name of its model axis)."""
    ranks = len(list(directory.glob("mp_rank_*_model_states.pt"))) or 1
    layers = list(directory.glob("layer_*-model_states.pt"))
    if not layers:
        return ranks, 1
    tensor_ranks = {
        m.group(1) for f in layers if (m := re.match(r"layer_\d+-model_(\d+)-model_states", f.name))
    }
    tensor = len(tensor_ranks) or 1
    return tensor, max(1, ranks // tensor)


def running_mesh(engine: Any) -> tuple[int, int]:
    autotp = getattr(engine, "autotp_size", None)
    tensor = max(1, int(autotp())) if autotp is not None else 1
    stages = getattr(engine, "num_stages", None)  # DeepSpeed's PipelineEngine only
    return tensor, int(stages) if isinstance(stages, int) else 1


def describe_mesh(mesh: tuple[int, int]) -> str:
    return f"tensor={mesh[0]} pipeline={mesh[1]}"


def check_mesh(directory: Path, engine: Any) -> None:
    """Refuse, naming both meshes, a checkpoint that cannot be re-sliced for this run's mesh: loading
    files cut for another mesh would train a scrambled model or fail midway.

    A change of tensor size alone is re-sliced (``Checkpointer._load``): DeepSpeed's AutoTP stores its
    slicing (``universal_checkpoint_info``, from ``collect_autotp_universal_checkpoint_info``) in every
    ``mp_rank_*_model_states.pt``; ``ds_to_universal`` merges the tensor ranks' slices into whole
    parameters by it, and the ZeRO-1/2 loader (``load_hp_checkpoint_state``) cuts this rank's slice
    back out, by the metadata AutoTP attached to the running parameters (``_get_param_uc_restore_meta``;
    a parameter without it, under data parallel, takes the whole tensor).

    A change of pipeline size at tensor 1 goes the same way: ``ds_to_universal`` reads a pipeline
    checkpoint's ZeRO partitions stage by stage (one ``*_mp_rank_<stage>_optim_states.pt`` each) into
    one folder per parameter, and a universal load restores weights and moments from those folders
    alone (``load_hp_checkpoint_state_from_checkpoint_dir``, by the running engine's parameter names;
    the per-layer files are not read), so each stage takes its own layers' parameters. To or from
    data parallel the folders are renamed first (``pipeline.universal_renames``). Refused:

    - a change of tensor size to or from a pipeline run, or of pipeline size under tensor > 1: the
      per-layer, per-tensor-rank files of tensor x pipeline are not converted;
    - a tensor or pipeline change of a ZeRO-0 checkpoint (``saved_partitions`` None):
      ``ds_to_universal`` reads the optimiser state from the ZeRO partitions (``*_optim_states.pt``),
      and at ZeRO-0 in FP32 DeepSpeed writes none (the torch optimiser's state is in each model-parallel
      rank's model states, in its slices' shapes); a universal load also needs a ZeRO or BF16
      optimiser, whose parameters carry ``load_hp_checkpoint_state``, so a ZeRO-0 FP32 run cannot take
      one either.
    """
    saved, running = saved_mesh(directory), running_mesh(engine)
    if saved == running:
        return
    universal = saved_partitions(directory) is not None and _loads_universal(engine)
    if saved[1] == running[1] == 1:
        if universal:
            return
        reason = (
            "a tensor size change goes through DeepSpeed's universal checkpoint, which needs ZeRO"
            " partitions (zeroStage 1 or 2) in the checkpoint and in this run"
        )
    elif saved[0] == running[0] == 1:
        if universal:
            return
        reason = (
            "a pipeline size change goes through DeepSpeed's universal checkpoint, which needs ZeRO"
            " partitions (zeroStage 1) in the checkpoint and in this run"
        )
    else:
        reason = "resume it with the same tensor and pipeline sizes"
    raise ConfigError(
        "spec.parallelism",
        f"checkpoint {directory.name} was written under parallelism {describe_mesh(saved)}, this run has"
        f" {describe_mesh(running)}: {reason}",
    )


def _renames(
    saved: tuple[int, int], running: tuple[int, int]
) -> Callable[[list[str]], dict[str, str]] | None:
    """The parameter renames a universal conversion from mesh ``saved`` to ``running`` needs: between
    the Llama's names and PipelineModule's when exactly one of them is a pipeline (see ``to_universal``);
    none otherwise (a pipeline's layer indices do not depend on its stage count)."""
    if (saved[1] > 1) == (running[1] > 1):
        return None
    from llmtrain.train.pipeline import universal_renames

    return functools.partial(universal_renames, to_pipeline=running[1] > 1)


def _loads_universal(engine: Any) -> bool:
    """Whether the running engine's optimiser can restore a universal checkpoint: DeepSpeed's ZeRO
    optimisers and its BF16 one do (``load_hp_checkpoint_state_from_checkpoint_dir``); a torch
    optimiser at ZeRO-0 in FP32 does not."""
    return hasattr(engine.optimizer, "load_hp_checkpoint_state_from_checkpoint_dir")


def _inner_optimizer(engine: Any) -> Any:
    """The torch optimiser under DeepSpeed's ZeRO wrapper (the wrapper itself below ZeRO)."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper)


def to_universal(
    source: Path, target: Path, renames: Callable[[list[str]], dict[str, str]] | None = None
) -> None:
    """DeepSpeed's own conversion (``ds_to_universal``) of a ZeRO-1/2/3 checkpoint into the universal
    layout: one fp32 tensor and its optimiser moments per parameter, loadable at any data-parallel
    size. Written through ``.tmp-`` and a rename like a save, so a crash leaves nothing half-converted.

    ``inject_missing_state``: the converter asks for the ``universal_checkpoint_info`` entry, which
    describes tensor/pipeline slicing. Under AutoTP DeepSpeed writes its own into every model-states
    file (kept: the flag only fills in a missing one); with data parallelism alone there is none.
    One worker each: the ranks of this job are busy waiting at a barrier, not idle cores.

    ``renames``: old name -> new name of the parameter folders (``zero/<name>/``), given their names,
    applied before the rename into place. A universal load finds a parameter's folder by the running
    engine's name for it, and PipelineModule names its parameters by layer index
    (``<i>.block.self_attn.q_proj.weight``) where the Llama has ``layers.<i - 1>.self_attn.q_proj.weight``:
    ``ds_to_universal`` keeps the names the writing engine used, and DeepSpeed has no hook to map them.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tmp = target.with_name(TMP_PREFIX + target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    if renames is not None:
        zero = tmp / "zero"
        folders = sorted(p.name for p in zero.iterdir() if p.is_dir())
        mapping = renames(folders)
        # The two layouts' names are disjoint (a layer index first, or not), so no rename overwrites.
        if sorted(mapping) != folders or len(set(mapping.values())) != len(folders):
            raise RuntimeError(f"the parameter renames of {source} are not one-to-one")
        for old, new in mapping.items():
            os.rename(zero / old, zero / new)
    os.rename(tmp, target)


@dataclass
class Restored:
    """What a resume found. ``rejected`` is filled on rank 0 only (the rank that verified)."""

    client: dict[str, Any] | None
    """The checkpoint's client state (step, data position, ...) plus "tag"; None: start from scratch."""
    fallbacks: int = 0
    """Checkpoints newer than the one used (or all, when starting from scratch) that failed verification."""
    rejected: list[tuple[Rejection, Path]] = field(default_factory=list)
    """(why, where it was moved to) per rejected checkpoint, newest first."""
    from_remote: str | None = None
    """Where the checkpoint was fetched from (storage.remote or resumeFrom); None: from the volume."""

    @property
    def tag(self) -> str | None:
        return None if self.client is None else str(self.client["tag"])

    @property
    def step(self) -> int:
        return 0 if self.client is None else int(self.client.get("step", 0))


def latest_tag(root: Path) -> str | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (root / tag).is_dir() else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, root: str | Path, keep_last: int, env: DistEnv, remote: Remote | None = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env
        self.remote = remote
        """Uploads and remote restores, on rank 0 only (None elsewhere, and without storage.remote)."""
        self.upload_wait_seconds = 0.0
        """How long the last save waited for room in the upload queue (part of save's duration)."""
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            # Half-written saves, and universal copies a crash kept from being removed after their load.
            for leftover in [*self.root.glob(TMP_PREFIX + "*"), *self.root.glob(UNIVERSAL_PREFIX + "*")]:
                shutil.rmtree(leftover, ignore_errors=True)
        barrier(env)

    @classmethod
    def for_config(cls, cfg: TrainerConfig, env: DistEnv) -> Checkpointer:
        """The job's checkpointer: paths.checkpointDir, keepLast, storage.remote and resumeFrom."""
        remote = Remote.for_config(cfg, Logger(env.rank), env.is_main)
        return cls(cfg.paths.checkpoint_dir, cfg.spec.training.checkpointing.keep_last, env, remote)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the remote series to the registry rank 0 serves (none without storage.remote)."""
        if self.remote is not None:
            self.remote.metrics.register(registry, uploads=self.remote.store is not None)

    def finish(self, output_dir: str | Path) -> str | None:
        """At the end of a run: upload the exported model and wait for every upload (rank 0).

        Returns the model's URI (None without storage.remote, or on other ranks); raises
        ConfigError (exit 2) or remote.RemoteError when the uploads could not complete.
        """
        return None if self.remote is None else self.remote.finish(output_dir)

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> float:
        """Write checkpoint ``step`` (a collective: every rank must call it); returns seconds taken."""
        start = time.perf_counter()
        tag = tag_for(step)
        tmp = TMP_PREFIX + tag
        engine.save_checkpoint(str(self.root), tag=tmp, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), self.root / tmp / f"rng-rank{self.env.rank:05d}.pt")
        barrier(self.env)  # every rank's shards are on disk before the checkpoint becomes visible
        if self.env.is_main:
            # Our addition to DeepSpeed's format: the manifest is what makes the directory "complete"
            # (see integrity.py). Hashing reads every file once; 1 MiB at a time, on this rank only.
            integrity.write_manifest(self.root / tmp, step)
            final = self.root / tag
            if final.exists():  # the same step saved again (e.g. SIGTERM right after an interval save)
                shutil.rmtree(final)
            os.rename(self.root / tmp, final)
            self._point_latest(tag)
            if self.remote is not None:  # waits only when maxPendingUploads are already queued
                self.upload_wait_seconds = self.remote.after_save(tag, final, step)
            self._prune()
        barrier(self.env)
        return time.perf_counter() - start

    def _point_latest(self, tag: str | None) -> None:
        """Rewrite ``latest`` atomically (remove it for None), for tools that read DeepSpeed's pointer."""
        pointer = self.root / LATEST
        if tag is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer_tmp = self.root / (TMP_PREFIX + LATEST)
            pointer_tmp.write_text(tag + "\n")
            os.replace(pointer_tmp, pointer)
        _fsync_dir(self.root)

    def _prune(self) -> None:
        # Rejected checkpoints were renamed out of step-*: only good ones count towards keepLast.
        # A checkpoint waiting for upload stays until it is uploaded (or superseded): remote.py.
        done = sorted(p for p in self.root.glob(TAG_PREFIX + "*") if p.is_dir())
        protected = set() if self.remote is None else self.remote.protected()
        for old in done[: -self.keep_last]:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, engine: Any) -> Restored:
        """Load the newest checkpoint that verifies into ``engine`` (a collective: every rank calls it).

        Rank 0 alone verifies (reading every file once, not once per rank) and sets rejected ones
        aside; the tag it chose is broadcast, so all ranks load the same checkpoint.
        """
        rejected: list[tuple[Rejection, Path]] = []
        choice: tuple[str | None, int, str | None, bool] = (None, 0, None, False)
        if self.env.is_main:
            tag, problems = select(self.root)
            rejected = [(problem, set_aside(problem.checkpoint)) for problem in problems]
            if rejected:
                self._point_latest(tag)
            fetched = None
            if self.remote is not None:
                try:
                    self.remote.check()  # a user-fixable problem ends the run before any training
                    fetched = None if tag is not None else self.remote.restore_into(self.root)
                except BaseException:
                    broadcast_from_main((None, 0, None, True), self.env)  # the other ranks stop too
                    raise
                if fetched is not None:
                    tag = fetched.tag
                    self._point_latest(tag)
            choice = (tag, len(problems), None if fetched is None else fetched.uri, False)
        tag, fallbacks, from_remote, failed = broadcast_from_main(choice, self.env)
        if failed:
            raise RuntimeError("rank 0 could not restore a checkpoint from remote storage (see its log)")
        if self.remote is not None and tag is not None:  # uploaded unless the remote copy is complete
            self.remote.after_restore(tag, self.root / tag)
        if tag is None:
            return Restored(None, fallbacks, rejected)
        path, client = self._load(engine, tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rng = self.root / tag / f"rng-rank{self.env.rank:05d}.pt"
        if rng.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seed
            _set_rng_state(torch.load(rng, weights_only=False))
        client = dict(client or {})
        client["tag"] = tag
        return Restored(client, fallbacks, rejected, from_remote)

    def _load(self, engine: Any, tag: str) -> tuple[str | None, dict[str, Any] | None]:
        """``engine.load_checkpoint`` of ``tag``; through a universal conversion when its ZeRO partitions
        were cut for another number of ranks (an elastic resize, or a job resubmitted at another size)
        or its parameters for another tensor or pipeline size (see ``check_mesh``).

        Rank 0 converts while the others wait; every rank then loads with DeepSpeed's
        ``load_universal`` switched on for this one load (it is a config flag, read only while loading),
        and the converted copy is removed afterwards: it is derived from the verified checkpoint, which
        stays the one of record.
        """
        directory = self.root / tag
        check_mesh(directory, engine)
        saved_tp_pp, running = saved_mesh(directory), running_mesh(engine)
        saved = saved_partitions(directory)
        # ZeRO partitions one model-parallel rank's parameters over the ranks holding the same slices.
        partitions = self.env.world_size // (running[0] * running[1])
        if saved_tp_pp == running and (saved is None or saved == partitions):
            loaded: tuple[str | None, dict[str, Any] | None] = engine.load_checkpoint(
                str(self.root), tag=tag, load_lr_scheduler_states=False
            )
            return loaded
        assert saved is not None, "check_mesh refuses a mesh change without ZeRO partitions"
        universal = self.root / (UNIVERSAL_PREFIX + tag)
        if self.env.is_main:
            start = time.perf_counter()
            if not universal.is_dir():
                to_universal(directory, universal, _renames(saved_tp_pp, running))
            Logger(self.env.rank).event(
                "checkpoint_resharded",
                checkpoint=tag,
                saved_ranks=saved * saved_tp_pp[0] * saved_tp_pp[1],
                ranks=self.env.world_size,
                saved_mesh=describe_mesh(saved_tp_pp),
                mesh=describe_mesh(running),
                seconds=round(time.perf_counter() - start, 3),
            )
        barrier(self.env)
        # DeepSpeed's ZeRO-3 universal load copies the first param group's hyperparameters onto every
        # group ("they should be the same", stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3),
        # which gives the no-decay group (norms, biases) weight decay. The groups' hyperparameters come
        # from the job's config, not from the checkpoint, so this run's own are put back after the load.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        engine._config.load_universal_checkpoint = True
        try:
            loaded = engine.load_checkpoint(
                str(self.root), tag=universal.name, load_lr_scheduler_states=False
            )
        finally:
            engine._config.load_universal_checkpoint = False
        for group, hyperparameters in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update(hyperparameters)
        # The same load also gives every ZeRO-3 sub-group one shared ``step`` tensor; torch's Adam
        # increments each state's step in place, so with a shared one every sub-group advanced it
        # and bias correction ran ahead (the loss drifted from the unresized run by 5e-4 in 15 steps).
        for state in _inner_optimizer(engine).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        barrier(self.env)
        if self.env.is_main:
            shutil.rmtree(universal, ignore_errors=True)
        return loaded
