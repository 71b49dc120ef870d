"""A training run's energy: each rank's GPU from NVML, each node's CPU packages from RAPL, summed over ranks.

Who reads what: on GPUs every rank reads its own device (LOCAL_RANK); RAPL counters are machine-wide,
so on CPU nodes only local rank 0 reads them (every rank reading would count the node procsPerNode
times). The total is unavailable (None) as soon as one rank that should measure cannot: a figure
that leaves out some nodes would look complete and be wrong.

Across restarts the energy up to the checkpoint a run resumes from travels in the checkpoint's client
state, so the figure covers the whole job except the work lost between a crash and its last
checkpoint (which the resumed attempt spends again, and measures).
"""

from __future__ import annotations

import torch

from llmtrain import energy
from llmtrain.train.dist import DistEnv, any_rank, mean_over_ranks


class RunEnergy:
    def __init__(self, env: DistEnv, resumed: bool = False, before: float | None = None) -> None:
        self.env = env
        on_gpu = torch.cuda.is_available()
        self.measures = on_gpu or env.local_rank == 0
        self.reader: energy.EnergyReader | None = None
        if self.measures:
            self.reader = energy.discover(cuda_devices=[env.local_rank] if on_gpu else None)
        self.before = before
        """Joules of earlier attempts up to the checkpoint this one resumed from (None: not measured)."""
        self.resumed = resumed

    @property
    def source(self) -> str | None:
        return None if self.reader is None else self.reader.source

    def start(self) -> None:
        if self.reader is not None:
            self.reader.start()

    def total(self) -> float | None:
        """Joules of the whole job so far, the same on every rank (a collective: all ranks call it)."""
        missing = self.measures and self.reader is None
        if any_rank(missing, self.env):
            return None
        local = self.reader.joules() if self.reader is not None else 0.0
        joules = mean_over_ranks(local, self.env) * self.env.world_size
        # A resumed attempt whose checkpoint carried no figure (older format, or an unmeasured run)
        # cannot say what came before: the job's total is unknown, not this attempt's alone.
        if self.resumed and self.before is None:
            return None
        return joules + (self.before or 0.0)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
