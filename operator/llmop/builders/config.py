"""The ConfigMap holding the rendered trainer configuration every pod of the job reads."""

from __future__ import annotations

import yaml

from llmop import naming
from llmop.builders import JobRef, Manifest, storage
from llmop_contract.api.v1alpha1.trainer_config import Paths, RunIdentity, TrainerConfig
from llmop_contract.deepspeed import render_deepspeed_config


def trainer_config(job: JobRef) -> TrainerConfig:
    return TrainerConfig(
        run=RunIdentity(job_name=job.name, namespace=job.namespace),
        paths=Paths(
            volume_dir=naming.STORAGE_MOUNT,
            data_dir=storage.DATA_DIR,
            checkpoint_dir=storage.CHECKPOINT_DIR,
            output_dir=storage.OUTPUT_DIR,
        ),
        spec=job.spec,
        deepspeed_config=render_deepspeed_config(job.spec),
    )


def build_config_map(job: JobRef) -> Manifest:
    text = yaml.safe_dump(trainer_config(job).to_wire(), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": job.metadata(naming.config_map_name(job.name), naming.common_labels(job.name)),
        "data": {naming.CONFIG_FILE: text},
    }
