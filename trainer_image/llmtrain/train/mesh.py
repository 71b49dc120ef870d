"""Which processes hold one model replica, and which replica this process is: the data-parallel
coordinates the loader splits batches by.

DeepSpeed lays tensor-parallel groups out on consecutive ranks (``deepspeed.utils.groups``:
a (data, tensor) mesh, row-major), so ranks 2r and 2r+1 of a tensor=2 job form replica r. The
operator gives each pod procsPerNode consecutive ranks and admission keeps tensor dividing
procsPerNode, so a tensor-parallel group never spans two pods: its two all-reduces per layer stay
on one node's links. Pipeline stages are the outer axis instead (DeepSpeed's (pipe, data, model)
topology, tensor innermost): with one stage per pod, only activations cross pods, once per
micro-batch and stage, and a stage's tensor groups stay consecutive ranks inside its pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmop_contract.api.v1alpha1.parallelism import ParallelismSpec
from llmtrain.train.dist import DistEnv


@dataclass(frozen=True)
class Mesh:
    tensor: int
    pipeline: int
    data_size: int
    """Model replicas: the world over the processes one replica takes."""
    data_rank: int
    """This process's replica: every process of one replica reads the same micro-batches."""
    sequence: int = 1

    @classmethod
    def of(cls, parallelism: ParallelismSpec, env: DistEnv) -> Mesh:
        per_replica = parallelism.model_parallel
        if env.world_size % per_replica:
            raise ValueError(
                f"WORLD_SIZE={env.world_size} is not a multiple of tensor x pipeline x sequence = {per_replica}"
            )
        replicas = env.world_size // per_replica
        if parallelism.pipeline > 1:
            # DeepSpeed's pipeline topology is (pipe, data, model), row-major: stage s holds ranks
            # s*replicas*tensor .. (s+1)*replicas*tensor - 1, each replica's tensor group consecutive.
            replica = (env.rank // parallelism.tensor) % replicas
            return cls(parallelism.tensor, parallelism.pipeline, replicas, replica)
        # Tensor and sequence groups are consecutive ranks (DeepSpeed's groups, SequenceGroups).
        return cls(parallelism.tensor, 1, replicas, env.rank // per_replica, parallelism.sequence)

    def groups(self) -> Any:
        """DeepSpeed's process groups for this mesh, built once, as the ``mpu`` deepspeed.initialize
        takes (None for pure data parallel). Passing it makes DeepSpeed count train_batch_size over
        data-parallel ranks: without it, AutoTP's config check counts every rank as one. None under
        pipeline parallel too: the PipelineModule's grid is the mpu there, and tensor x pipeline
        needs its groups, not the (data, tensor) mesh built here (see pipeline.adopt_tensor_parallel)."""
        if self.tensor == 1 or self.pipeline > 1:
            return None
        from deepspeed.utils import groups

        groups._init_tp_mesh_device(tensor_model_parallel_size=self.tensor)  # once: a no-op after
        return groups

    def describe(self) -> str:
        text = f"data={self.data_size} x tensor={self.tensor}"
        text += f" x pipeline={self.pipeline}" if self.pipeline > 1 else ""
        return text + (f" x sequence={self.sequence}" if self.sequence > 1 else "")
