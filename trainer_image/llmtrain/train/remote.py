"""Checkpoints and models copied to ``spec.storage.remote.uri``, in the background, complete or not at all.

Layout and marker: ``llmop_contract.remote``. Every tree this module uploads ends with MARKER, written
last, listing each file's size and sha256; a reader takes a tree without it for an upload cut short
and never loads it. Rotation removes the marker first for the same reason.

Checkpoints (rank 0, a background thread). A checkpoint committed on the volume (checkpoint.py) is
queued; the worker uploads it file by file, then the marker. The queue holds at most
``maxPendingUploads`` checkpoints (the one uploading included): a save finding it full waits, and that
wait is counted (``llmtrain_remote_upload_wait_seconds_total``); a checkpoint in the queue is never
deleted by the volume's keep-last rotation. A failed attempt is retried with exponential backoff, each
failure a WARNING line (the error, never a credential), a count in REMOTE_UPLOAD_FAILURES and
REMOTE_UPLOAD_FAILING 1 until an upload succeeds. While uploads fail, a newer checkpoint replaces the
older ones waiting (one WARNING line each): training does not stall behind an upload that cannot
finish, and the newest checkpoint is the one worth having.

Failures do not stop training: the checkpoint is safe on the volume. They stop the job from
*succeeding* with its uploads missing: at the end ``finish`` uploads the exported model and waits for
everything with a bounded deadline; what is still missing then fails the run, exit 2 (ConfigError,
never retried) when the cause is the user's to fix (wrong credentials, a missing bucket, an endpoint
that does not answer: llmtrain.objectstore.problem), else a crash that the operator retries.

Restore (rank 0, before training): when the volume has no checkpoint that verifies, the newest remote
checkpoint with a marker is downloaded into ``.tmp-<tag>`` on the volume, checked against the marker
and the checkpoint's own manifest, and renamed into place; ``training.checkpointing.resumeFrom`` is the
same from another job's checkpoint when this job has none of its own, locally or remotely.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry, Counter, Gauge

from llmop_contract import remote as layout
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.api.v1alpha1.workload import ObjectStore
from llmop_contract.protocol import Env, Metric
from llmtrain.config import ConfigError, DataError
from llmtrain.logs import Logger
from llmtrain.train import integrity

FORMAT = "llmop-upload-v1"
REMOTE_FIELD = "spec.storage.remote.uri"
RESUME_FIELD = "spec.training.checkpointing.resumeFrom"

# Tuning knobs of the trainer (not of the API): tests shorten them; the defaults suit real jobs.
BACKOFF_ENV = "LLMTRAIN_REMOTE_BACKOFF_SECONDS"
"""First retry delay; it doubles per consecutive failure up to BACKOFF_MAX_ENV (default 1 s)."""
BACKOFF_MAX_ENV = "LLMTRAIN_REMOTE_BACKOFF_MAX_SECONDS"
"""Longest retry delay (default 60 s)."""
DRAIN_ENV = "LLMTRAIN_REMOTE_DRAIN_SECONDS"
"""How long the end of a run waits for its uploads at most (default 1800 s)."""
GIVE_UP_ENV = "LLMTRAIN_REMOTE_GIVE_UP_SECONDS"
"""At the end, stop waiting once uploads have failed for this long without a success (default 300 s)."""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def redact(text: str) -> str:
    """``text`` without credentials (URL userinfo, credential variables' values): objectstore.redact."""
    from llmtrain.objectstore import redact as redact_credentials

    return redact_credentials(text)


def describe(exc: BaseException) -> str:
    """One line for a log or a message: the exception's type and first line, credentials removed."""
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)


# --- trees and markers ------------------------------------------------------------------------------

Files = dict[str, dict[str, Any]]
"""relative path -> {"size": bytes, "sha256": hex}."""


def tree_files(directory: Path) -> Files:
    """Size and sha256 of every file under ``directory`` (an exported model: hashed here, once)."""
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": integrity.sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def checkpoint_files(directory: Path) -> Files:
    """A committed checkpoint's files: its integrity manifest's hashes (computed at commit), plus the
    manifest itself, so that a downloaded copy verifies like a local one."""
    manifest_path = directory / integrity.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    files: Files = {
        name: {"size": int(e["size"]), "sha256": str(e["sha256"])} for name, e in manifest["files"].items()
    }
    files[integrity.MANIFEST] = {
        "size": manifest_path.stat().st_size,
        "sha256": integrity.sha256_file(manifest_path),
    }
    return files


def check_sizes(directory: Path, files: Files) -> str | None:
    """What is wrong with the local tree before it is uploaded (a stat per file, no hashing)."""
    for name, entry in files.items():
        try:
            size = (directory / name).stat().st_size
        except OSError:
            return f"{directory / name} is missing"
        if size != entry["size"]:
            return f"{directory / name} has {size} bytes, expected {entry['size']}"
    return None


@dataclass(frozen=True)
class Store:
    """One prefix in an object store: the fsspec filesystem, its path there, and the URI users see."""

    fs: Any
    root: str
    uri: str

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def url(self, *parts: str) -> str:
        return layout.join(self.uri, *parts)

    def read_marker(self, tree: str) -> dict[str, Any] | None:
        """The tree's marker, or None when it has none (incomplete, or never uploaded)."""
        try:
            raw = self.fs.cat_file(self.path(tree, layout.MARKER))
        except FileNotFoundError:
            return None
        try:
            marker = json.loads(raw)
        except ValueError:
            return None
        return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None

    def listdir(self, tree: str) -> list[str]:
        """Names directly under ``tree`` (none when it does not exist); never a cached listing."""
        self.fs.invalidate_cache(self.path(tree))
        try:
            entries = self.fs.ls(self.path(tree), detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})

    def put_tree(
        self,
        local: Path,
        tree: str,
        files: Files,
        extra: dict[str, Any],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Upload ``files`` of ``local`` to ``tree``, then the marker. False if ``cancelled`` first.

        An earlier marker goes first, so the tree is never complete while its files are replaced.
        Each object's size is read back before the marker vouches for it.
        """
        marker_path = self.path(tree, layout.MARKER)
        try:
            self.fs.rm_file(marker_path)
        except FileNotFoundError:
            pass
        for name in sorted(files):
            if cancelled():
                return False
            self.fs.put_file(str(local / name), self.path(tree, name))
        self.fs.invalidate_cache(self.path(tree))
        for name, entry in files.items():
            size = int(self.fs.size(self.path(tree, name)))
            if size != entry["size"]:
                raise OSError(
                    f"{self.url(tree, name)} has {size} bytes after upload, expected {entry['size']}"
                )
        if cancelled():
            return False
        marker = {"format": FORMAT, "files": files, "uploadedAt": round(time.time(), 3), **extra}
        self.fs.pipe_file(marker_path, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
        return True

    def remove_tree(self, tree: str) -> None:
        """Marker first: a tree whose deletion is interrupted is incomplete, never a damaged 'complete' one."""
        marker = self.path(tree, layout.MARKER)
        try:
            self.fs.rm_file(marker)
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self.path(tree), recursive=True)
        except FileNotFoundError:
            pass

    def get_tree(self, tree: str, files: Files, dest: Path) -> str | None:
        """Download ``files`` of ``tree`` into ``dest`` and check them; None, or what is wrong."""
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.path(tree, name), str(target))
        for name, entry in files.items():
            size = (dest / name).stat().st_size
            if size != entry["size"]:
                return f"{self.url(tree, name)}: {size} bytes, the marker says {entry['size']}"
            if integrity.sha256_file(dest / name) != entry["sha256"]:
                return f"{self.url(tree, name)}: checksum differs from the marker's"
        return None


def open_store(store: ObjectStore, uri: str) -> Store:
    """The Store for ``uri`` through llmtrain.objectstore (endpoint, region, addressing of the spec)."""
    from llmtrain import objectstore

    fs, root = objectstore.filesystem(store, uri)
    return Store(fs, str(root).rstrip("/"), uri.rstrip("/"))


def user_problem(exc: BaseException, uri: str, field: str) -> str | None:
    """The user-fixable problem behind ``exc`` (a line naming ``field``, no credentials), else None."""
    from llmtrain import objectstore

    found = objectstore.problem(exc, uri, field)
    return None if found is None else redact(found)


# --- metrics ------------------------------------------------------------------------------------------


class RemoteMetrics:
    """The remote series, created unregistered so they can exist before the training loop's registry."""

    def __init__(self) -> None:
        self.resumed_from_remote = Gauge(
            Metric.RESUMED_FROM_REMOTE.value,
            "1 when the run restored its checkpoint from storage.remote or resumeFrom",
            registry=None,
        )
        self.checkpoint_step = Gauge(
            Metric.REMOTE_CHECKPOINT_STEP.value,
            "Step of the newest checkpoint complete under storage.remote (0: none)",
            registry=None,
        )
        self.pending = Gauge(
            Metric.REMOTE_UPLOADS_PENDING.value,
            "Checkpoints saved on the volume and not yet complete remotely",
            registry=None,
        )
        self.failures = Counter(
            Metric.REMOTE_UPLOAD_FAILURES.value.removesuffix("_total"),
            "Upload attempts that failed (each retried with backoff)",
            registry=None,
        )
        self.failing = Gauge(
            Metric.REMOTE_UPLOAD_FAILING.value,
            "1 while the latest upload attempt failed and none has succeeded since",
            registry=None,
        )
        self.wait_seconds = Counter(
            "llmtrain_remote_upload_wait_seconds",
            "Seconds checkpoint saves waited for a full upload queue",
            registry=None,
        )

    def register(self, registry: CollectorRegistry, uploads: bool = True) -> None:
        """Add the series to ``registry``; without ``uploads`` (resumeFrom alone) only RESUMED_FROM_REMOTE."""
        metrics: list[Gauge | Counter] = [self.resumed_from_remote]
        if uploads:
            metrics += [self.checkpoint_step, self.pending, self.failures, self.failing, self.wait_seconds]
        for metric in metrics:
            registry.register(metric)


# --- the uploader ---------------------------------------------------------------------------------


@dataclass
class Job:
    """One tree to upload: a checkpoint (``step`` set) or a model."""

    tree: str
    local: Path
    step: int | None = None
    only_if_missing: bool = False
    """A checkpoint found on the volume at a resume: uploaded unless the remote copy is already complete."""
    cancelled: bool = False
    done: bool = False
    error: str | None = None
    problem: str | None = None
    uri: str = ""

    @property
    def tag(self) -> str:
        return posixpath.basename(self.tree)


@dataclass
class Backoff:
    first: float = field(default_factory=lambda: _env_float(BACKOFF_ENV, 1.0))
    longest: float = field(default_factory=lambda: _env_float(BACKOFF_MAX_ENV, 60.0))

    def delay(self, failures: int) -> float:
        return float(min(self.longest, self.first * 2 ** max(failures - 1, 0)))


class Uploader:
    """Rank 0's upload queue and the thread that empties it (started on the first job)."""

    def __init__(
        self,
        store: Store,
        keep_last: int,
        max_pending: int,
        log: Logger,
        metrics: RemoteMetrics,
        backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        self.keep_last = keep_last
        self.max_pending = max_pending
        self.log = log
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._closed = False
        self._reported: set[str] = set()
        self.newest_step = 0
        self.problem: str | None = None
        """The latest user-fixable problem seen (None once an upload succeeds after it)."""
        self.last_error: str | None = None

    # -- the training loop's side

    def _checkpoints(self) -> list[Job]:
        return [j for j in self._jobs if j.step is not None]

    def protected(self) -> set[str]:
        """Checkpoint tags queued or uploading: the volume's rotation must keep them."""
        with self._cond:
            return {j.tag for j in self._checkpoints()}

    def pending(self) -> int:
        with self._cond:
            return len(self._checkpoints())

    def submit_checkpoint(self, tag: str, local: Path, step: int, only_if_missing: bool = False) -> float:
        """Queue a committed checkpoint; returns the seconds spent waiting for room in the queue."""
        started = time.perf_counter()
        job = Job(posixpath.join(layout.CHECKPOINTS, tag), local, step, only_if_missing)
        with self._cond:
            while len(self._checkpoints()) >= self.max_pending and self._failing_since is None:
                self._cond.wait(timeout=1.0)
            if self._failing_since is not None:
                for old in self._checkpoints():  # uploads fail: the newest checkpoint supersedes them
                    old.cancelled = True
                    self._jobs.remove(old)
                    self.log.warning(
                        "remote_upload_superseded",
                        checkpoint=old.tag,
                        by=tag,
                        message=f"upload of {old.tag} abandoned while uploads fail: {tag} replaces it",
                    )
            self._jobs.append(job)
            self._changed()
            self._start()
        waited = time.perf_counter() - started
        if waited > 0.001:
            self.metrics.wait_seconds.inc(waited)
        return waited

    def submit_tree(self, tree: str, local: Path, only_if_missing: bool = False) -> Job:
        """Queue a model directory (uploaded after the checkpoints queued before it)."""
        job = Job(tree, local, only_if_missing=only_if_missing)
        with self._cond:
            self._jobs.append(job)
            self._changed()
            self._start()
        return job

    def drain(self, deadline: float, give_up: float) -> bool:
        """Wait until the queue is empty (True), ``deadline`` (monotonic) passes, or uploads have been
        failing for ``give_up`` seconds without a success (False)."""
        with self._cond:
            while self._jobs:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if self._failing_since is not None and now - self._failing_since >= give_up:
                    return False
                self._cond.wait(timeout=min(1.0, deadline - now))
            return True

    def queued_checkpoints(self) -> list[str]:
        with self._cond:
            return [j.tree for j in self._checkpoints()]

    def _changed(self) -> None:
        """With the lock held: the pending gauge follows the queue; waiters look again."""
        self.metrics.pending.set(len(self._checkpoints()))
        self._cond.notify_all()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="llmtrain-upload", daemon=True)
            self._thread.start()

    # -- the worker

    def close(self) -> None:
        """Abandon what is queued and stop the worker (a process that ends need not call it)."""
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancelled = True
            self._jobs.clear()
            self._changed()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs[0]
            self._attempt_until_done(job)
            with self._cond:
                if self._jobs and self._jobs[0] is job:
                    self._jobs.popleft()
                self._changed()

    def _attempt_until_done(self, job: Job) -> None:
        background_priority()
        failures = 0
        while not job.cancelled:
            try:
                if self._upload(job):
                    return
            except Exception as exc:  # every failure is retried: which are permanent is not ours to guess
                if job.cancelled:
                    return
                failures += 1
                self._failed(job, exc, failures)
                with self._cond:  # a superseding save wakes the wait
                    self._cond.wait_for(lambda: job.cancelled, timeout=self.backoff.delay(failures))
                continue
            return  # cancelled mid-upload

    def _upload(self, job: Job) -> bool:
        store = self.store
        if job.step is not None:
            files = checkpoint_files(job.local)
            extra: dict[str, Any] = {"step": job.step}
        else:
            files = tree_files(job.local)
            extra = {}
        wrong = check_sizes(job.local, files)
        if wrong is not None:
            raise OSError(f"the local copy changed before upload: {wrong}")
        started = time.perf_counter()
        if job.only_if_missing and _same_files(store.read_marker(job.tree), files):
            uploaded = True
            self.log.event("remote_already_complete", uri=store.url(job.tree))
        else:
            uploaded = store.put_tree(job.local, job.tree, files, extra, lambda: job.cancelled)
            if not uploaded:
                return False
            self.log.event(
                "remote_uploaded",
                uri=store.url(job.tree),
                files=len(files),
                bytes=sum(int(e["size"]) for e in files.values()),
                seconds=round(time.perf_counter() - started, 3),
            )
        job.done, job.uri = True, store.url(job.tree)
        with self._cond:
            if self._failing_since is not None:
                self.log.event("remote_upload_recovered", uri=job.uri)
            self._failing_since, self.problem, self.last_error = None, None, None
            self.metrics.failing.set(0)
        if job.step is not None:
            self.newest_step = max(self.newest_step, job.step)
            self.metrics.checkpoint_step.set(self.newest_step)
            try:
                self._rotate(job.step)
            except Exception as exc:  # the upload stands; the next upload's rotation tries again
                self.log.warning(
                    "remote_rotation_failed",
                    uri=store.url(layout.CHECKPOINTS),
                    error=describe(exc),
                    message=f"removing old checkpoints under {store.url(layout.CHECKPOINTS)} failed: {describe(exc)}",
                )
        return uploaded

    def _failed(self, job: Job, exc: Exception, failures: int) -> None:
        uri = self.store.url(job.tree)
        try:
            problem = user_problem(exc, self.store.uri, REMOTE_FIELD)
        except Exception:  # classifying must never stop the worker
            problem = None
        error = describe(exc)
        delay = self.backoff.delay(failures)
        with self._cond:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            job.error, job.problem = error, problem
            self.problem, self.last_error = problem, error
            self.metrics.failures.inc()
            self.metrics.failing.set(1)
            self._cond.notify_all()  # a save waiting for room may now supersede instead
        self.log.warning(
            "remote_upload_failed",
            uri=uri,
            attempt=failures,
            retry_in_seconds=round(delay, 3),
            error=error,
            message=f"upload to {uri} failed (attempt {failures}, retried in {delay:.3g} s): {error}",
        )
        if problem is not None and problem not in self._reported:
            self._reported.add(problem)  # once per distinct problem, beside the per-attempt lines
            self.log.warning(
                "remote_storage_problem",
                field=REMOTE_FIELD,
                message=problem + " (training continues; the checkpoints stay on the volume)",
            )

    def _rotate(self, newest: int) -> None:
        """Keep the newest keepLast complete checkpoints; drop older ones and older incomplete trees."""
        store = self.store
        steps = sorted(
            ((s, name) for name in store.listdir(layout.CHECKPOINTS) if (s := _step_of(name)) is not None),
            reverse=True,
        )
        complete = 0
        for step, name in steps:
            tree = posixpath.join(layout.CHECKPOINTS, name)
            if step > newest:
                continue  # not ours to judge (a newer upload than this one cannot be in flight)
            if store.read_marker(tree) is not None:
                complete += 1
                if complete <= self.keep_last:
                    continue
            elif step == newest or not store.fs.find(store.path(tree)):
                continue  # the newest is not ours to judge; nothing under it: an empty directory entry
            store.remove_tree(tree)
            self.log.event("remote_checkpoint_removed", uri=store.url(tree))


UPLOAD_NICE = 19


def background_priority() -> None:
    """The lowest CPU priority for this thread and fsspec's I/O thread (which does s3fs's requests,
    signing and checksums): on a CPU-bound node the upload then takes only the cycles training leaves.

    Linux schedules threads as tasks, so setpriority on a thread id nices that thread alone. Where it
    is not allowed or not Linux, uploads run at normal priority.
    """
    import fsspec.asyn

    threads = [threading.current_thread(), fsspec.asyn.iothread[0]]
    for thread in threads:
        tid = getattr(thread, "native_id", None)
        if tid is None:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < UPLOAD_NICE:
                os.setpriority(os.PRIO_PROCESS, tid, UPLOAD_NICE)
        except (OSError, AttributeError):
            pass


def _step_of(tag: str) -> int | None:
    number = tag.removeprefix("step-")
    return int(number) if tag.startswith("step-") and number.isdigit() else None


def _same_files(marker: dict[str, Any] | None, files: Files) -> bool:
    if marker is None:
        return False
    theirs = marker.get("files", {})
    return {k: (int(v["size"]), v["sha256"]) for k, v in theirs.items()} == {
        k: (int(v["size"]), v["sha256"]) for k, v in files.items()
    }


# --- restore ----------------------------------------------------------------------------------------


def complete_checkpoints(store: Store) -> list[tuple[int, str, dict[str, Any]]]:
    """(step, tag, marker) of every remote checkpoint whose marker is there, newest first."""
    out = []
    for name in store.listdir(layout.CHECKPOINTS):
        step = _step_of(name)
        if step is None:
            continue
        marker = store.read_marker(posixpath.join(layout.CHECKPOINTS, name))
        if marker is not None:
            out.append((step, name, marker))
    return sorted(out, key=lambda item: item[0], reverse=True)


def download_checkpoint(store: Store, tree: str, marker: dict[str, Any], root: Path, tag: str) -> str | None:
    """Fetch ``tree`` into ``root/.tmp-<tag>``, verify it, rename it to ``root/<tag>``; None or why not."""
    tmp = root / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    wrong = store.get_tree(tree, marker["files"], tmp)
    if wrong is None and (rejection := integrity.verify(tmp)) is not None:
        wrong = str(rejection)
    if wrong is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return wrong
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return None


def copy_checkpoint(source: Path, root: Path, tag: str) -> None:
    """A checkpoint directory on a filesystem (another job's volume) copied in, then renamed into place."""
    tmp = root / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


# --- what the checkpointer and the loop use --------------------------------------------------------


@dataclass
class Restore:
    """A checkpoint fetched onto the volume: its tag there and where it came from."""

    tag: str
    uri: str


class Remote:
    """storage.remote and resumeFrom for one run, on rank 0 (the other ranks have None)."""

    def __init__(self, cfg: TrainerConfig, log: Logger) -> None:
        spec = cfg.spec
        self.cfg = cfg
        self.log = log
        self.metrics = RemoteMetrics()
        self.object_store = spec.storage.object_store
        self.resume_from = spec.training.checkpointing.resume_from
        settings = spec.storage.remote
        self.store: Store | None = None
        self.uploader: Uploader | None = None
        if settings is not None:
            self.store = open_store(self.object_store, settings.uri)
            self.uploader = Uploader(
                self.store,
                spec.training.checkpointing.keep_last,
                settings.max_pending_uploads,
                log,
                self.metrics,
            )

    @classmethod
    def for_config(cls, cfg: TrainerConfig, log: Logger, is_main: bool) -> Remote | None:
        spec = cfg.spec
        if not is_main or (spec.storage.remote is None and spec.training.checkpointing.resume_from is None):
            return None
        return cls(cfg, log)

    # -- restore

    def check(self) -> None:
        """Write and delete a probe object under storage.remote.uri, before any training.

        Wrong credentials, a missing bucket or an unreachable endpoint would otherwise surface at the
        first upload, after the first interval of training: a user-fixable problem ends the run here
        (ConfigError, exit 2); anything else is a WARNING (the uploads retry, a restore raises).
        """
        if self.store is None:
            return
        probe = self.store.path(f".llmop-probe-{os.getpid()}")
        try:
            self.store.fs.pipe_file(probe, b"llmop: checking that storage.remote is writable\n")
            self.store.fs.rm_file(probe)
        except Exception as exc:
            problem = user_problem(exc, self.store.uri, REMOTE_FIELD)
            if problem is not None:
                refuse(problem, exc)
            self.log.warning(
                "remote_check_failed",
                uri=self.store.uri,
                error=describe(exc),
                message=f"storage.remote {self.store.uri} is not writable now ({describe(exc)}): uploads will retry",
            )

    def restore_into(self, root: Path) -> Restore | None:
        """Fetch a checkpoint when the volume has none: storage.remote's newest, else resumeFrom."""
        if self.store is not None:
            found = self._from_remote(self.store, root)
            if found is not None:
                return found
        if self.resume_from is not None:
            return self._from_resume_from(root)
        return None

    def _from_remote(self, store: Store, root: Path) -> Restore | None:
        try:
            available = complete_checkpoints(store)
        except Exception as exc:
            # Without a listing nobody can tell "first start" from "the volume lost its checkpoints":
            # starting from scratch could overwrite a run's progress, so the run does not start.
            self._refuse_or_raise(exc, store.uri, REMOTE_FIELD, "cannot list the remote checkpoints")
        if available:
            self.metrics.checkpoint_step.set(available[0][0])
            assert self.uploader is not None
            self.uploader.newest_step = available[0][0]
        for step, tag, marker in available:
            tree = posixpath.join(layout.CHECKPOINTS, tag)
            started = time.perf_counter()
            try:
                wrong = download_checkpoint(store, tree, marker, root, tag)
            except Exception as exc:
                self._refuse_or_raise(exc, store.uri, REMOTE_FIELD, f"cannot download {store.url(tree)}")
            if wrong is not None:
                self.log.warning(
                    "remote_checkpoint_rejected",
                    uri=store.url(tree),
                    reason=wrong,
                    message=f"remote checkpoint {store.url(tree)} does not verify, trying an older one: {wrong}",
                )
                continue
            return self._restored(tag, store.url(tree), step, time.perf_counter() - started)
        return None

    def _from_resume_from(self, root: Path) -> Restore:
        uri = self.resume_from
        assert uri is not None
        from llmop_contract.sources import SourceKind, parse

        try:
            kind = parse(uri).kind
        except ValueError as exc:
            raise DataError(RESUME_FIELD, str(exc)) from exc
        started = time.perf_counter()
        if kind is SourceKind.OBJECT:
            try:
                store = open_store(self.object_store, posixpath.dirname(uri.rstrip("/")))
                tag = posixpath.basename(uri.rstrip("/"))
                self._tag_or_refuse(tag, uri)
                marker = store.read_marker(tag)
                if marker is None:
                    raise DataError(
                        RESUME_FIELD,
                        f"{uri!r} holds no complete checkpoint (no {layout.MARKER}: missing, or its upload never finished)",
                    )
                wrong = download_checkpoint(store, tag, marker, root, tag)
            except ConfigError:
                raise
            except Exception as exc:
                self._refuse_or_raise(exc, uri, RESUME_FIELD, f"cannot read {uri}")
            if wrong is not None:
                raise DataError(RESUME_FIELD, f"{uri!r} does not verify: {wrong}")
            return self._restored(tag, uri, int(marker.get("step", 0)), time.perf_counter() - started)
        location = uri.removeprefix("file://")
        path = Path(location) if location.startswith("/") else Path(self.cfg.paths.volume_dir) / location
        tag = path.name
        self._tag_or_refuse(tag, uri)
        if not path.is_dir():
            raise DataError(RESUME_FIELD, f"{uri!r} ({path}) is not a directory")
        rejection = integrity.verify(path)
        if rejection is not None:
            raise DataError(
                RESUME_FIELD, f"{uri!r} is not a complete checkpoint: {rejection.reason} ({rejection})"
            )
        copy_checkpoint(path, root, tag)
        step = _step_of(tag) or 0
        return self._restored(tag, uri, step, time.perf_counter() - started)

    @staticmethod
    def _tag_or_refuse(tag: str, uri: str) -> None:
        if _step_of(tag) is None:
            raise DataError(RESUME_FIELD, f"{uri!r} must name a checkpoint directory (step-NNNNNNNN)")

    def _restored(self, tag: str, uri: str, step: int, seconds: float) -> Restore:
        self.metrics.resumed_from_remote.set(1)
        self.log.event("resumed_from_remote", checkpoint=tag, uri=uri, step=step, seconds=round(seconds, 3))
        return Restore(tag, uri)

    def _refuse_or_raise(self, exc: BaseException, uri: str, field: str, what: str) -> NoReturn:
        problem = user_problem(exc, uri, field)
        if problem is not None:
            refuse(problem, exc)
        raise RemoteError(f"{what}: {describe(exc)}") from exc

    # -- uploads

    def protected(self) -> set[str]:
        return set() if self.uploader is None else self.uploader.protected()

    def after_save(self, tag: str, directory: Path, step: int) -> float:
        return 0.0 if self.uploader is None else self.uploader.submit_checkpoint(tag, directory, step)

    def after_restore(self, tag: str, directory: Path) -> None:
        """A checkpoint this run resumes from the volume: make sure it is remote too."""
        step = _step_of(tag)
        if self.uploader is not None and step is not None:
            self.uploader.submit_checkpoint(tag, directory, step, only_if_missing=True)

    def finish(self, output_dir: str | Path) -> str | None:
        """Upload model/ and adapter/ (when exported), wait for every upload; the model's URI.

        Raises ConfigError (exit 2) or RemoteError (a crash, retried) naming what is missing.
        """
        if self.uploader is None or self.store is None:
            return None
        out = Path(output_dir)
        jobs = [
            self.uploader.submit_tree(tree, out / tree, only_if_missing=True)
            for tree in (layout.MODEL, layout.ADAPTER)
            if (out / tree).is_dir()
        ]
        now = time.monotonic()
        finished = self.uploader.drain(now + _env_float(DRAIN_ENV, 1800.0), _env_float(GIVE_UP_ENV, 300.0))
        model = next((j for j in jobs if j.tree == layout.MODEL), None)
        if finished and all(j.done for j in jobs):
            return None if model is None else model.uri
        missing = [self.store.url(j.tree) for j in jobs if not j.done]
        missing += [self.store.url(tree) for tree in self.uploader.queued_checkpoints()]
        fail(self.log, self.uploader.problem, self.uploader.last_error, missing or [self.store.uri])


class RemoteError(RuntimeError):
    """Uploads or the restore could not complete for a reason that may pass (the operator retries)."""


def fail(log: Logger, problem: str | None, error: str | None, missing: list[str]) -> NoReturn:
    """End the run: ConfigError (exit 2) for a problem the user must fix, else RemoteError."""
    what = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    message = (
        f"{problem}: not uploaded: {what}"
        if problem
        else f"uploads to storage.remote did not complete ({error or 'timed out'}): not uploaded: {what}"
    )
    log.warning("remote_upload_incomplete", missing=len(missing), message=message)
    if problem is not None:
        refuse(message)
    raise RemoteError(message)


def refuse(message: str, cause: BaseException | None = None) -> NoReturn:
    """Raise the ConfigError for a user-fixable remote problem (exit 2), and tell a wrapping launcher.

    Under torchrun the worker's exit code is lost (torchrun exits 1), so rank 0 also writes the
    status file that ``llmtrain train``'s launcher reads (launch.py) to exit 2 itself.
    """
    status = os.environ.get(Env.STATUS_FILE)
    if status:
        Path(status).write_text(f"refused {message}\n")
    raise ConfigError(message) from cause


def upload_model(cfg: TrainerConfig, local: Path, tree: str, log: Logger) -> str | None:
    """Upload one model directory under storage.remote (a compression stage): its URI, or None when
    storage.remote is unset. Waits like the end of training; raises like ``Remote.finish``."""
    settings = cfg.spec.storage.remote
    if settings is None:
        return None
    store = open_store(cfg.spec.storage.object_store, settings.uri)
    log = Logger(log.rank, log.json)
    uploader = Uploader(store, cfg.spec.training.checkpointing.keep_last, 1, log, RemoteMetrics())
    job = uploader.submit_tree(tree, local, only_if_missing=True)
    finished = uploader.drain(
        time.monotonic() + _env_float(DRAIN_ENV, 1800.0), _env_float(GIVE_UP_ENV, 300.0)
    )
    if finished and job.done:
        return job.uri
    fail(log, uploader.problem, uploader.last_error, [store.url(tree)])
