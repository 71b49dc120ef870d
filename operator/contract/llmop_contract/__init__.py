"""The operator-trainer contract: API models, CRD generation, DeepSpeed config, pod protocol.

Everything here is imported by both images, so it depends on pydantic and pyyaml only.
"""
