"""The world an attempt runs in: which sizes the spec allows, and the config as that size sees it.

Pure Python (no torch): ``llmtrain train`` checks the pod's NNODES with it before the launcher starts
torchrun (which would turn a refusal's exit 2 into 1), and every rank checks WORLD_SIZE again.
"""

from __future__ import annotations

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.config import ConfigError


def allowed_worlds(cfg: TrainerConfig) -> list[int]:
    """The world sizes this job may train at: numNodes x procsPerNode, or for an elastic gang every
    size of ``elastic_sizes`` (minNodes..maxNodes keeping globalBatchSize) x procsPerNode."""
    w = cfg.spec.workers
    nodes = cfg.spec.elastic_sizes() if w.elastic else [w.num_nodes]
    return sorted(n * w.procs_per_node for n in nodes)


def check_world(cfg: TrainerConfig, world_size: int) -> None:
    """Refuse a world the spec does not allow, before any rank builds a model for it."""
    allowed = allowed_worlds(cfg)
    if world_size in allowed:
        return
    w, tr = cfg.spec.workers, cfg.spec.training
    if not w.elastic:
        raise ConfigError(
            "spec.workers",
            f"WORLD_SIZE={world_size} but workers.numNodes x workers.procsPerNode = {allowed[0]} (model"
            f" replicas of parallelism tensor x pipeline x sequence = {cfg.spec.parallelism.model_parallel}"
            " processes each)",
        )
    raise ConfigError(
        "spec.workers",
        f"WORLD_SIZE={world_size} is not a size this elastic gang trains at: allowed {allowed}"
        f" (minNodes {w.smallest}..maxNodes {w.largest} x procsPerNode {w.procs_per_node}, holding whole"
        f" model replicas of {cfg.spec.parallelism.model_parallel} processes, where microBatchSize"
        f" {tr.micro_batch_size} x replicas divides globalBatchSize {tr.global_batch_size})",
    )


def at_world(cfg: TrainerConfig, world_size: int) -> TrainerConfig:
    """``cfg`` as this attempt runs it: numNodes the running size (an allowed world, see _check_world).

    The ConfigMap keeps the spec as written (numNodes the preferred size of an elastic gang); what
    counts processes (the data check's one global micro-batch, gradient accumulation) must count
    those running.
    """
    spec = cfg.spec.at_size(world_size // cfg.spec.workers.procs_per_node)
    return cfg if spec is cfg.spec else cfg.model_copy(update={"spec": spec})
