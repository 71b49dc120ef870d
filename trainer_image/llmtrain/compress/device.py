"""``--device auto|cpu|cuda`` for serving and compression: where a model runs, and what refuses.

``auto`` is CUDA when ``torch.cuda.is_available()``, the CPU otherwise, except for work that only runs
on the CPU (the quantised layout's int8/int4 kernels are PyTorch's CPU ones; on a GPU they would fall
back to dequantising every weight at every step): ``auto`` picks the CPU there, and ``cuda`` is refused
with a line saying why. ``cuda`` without a usable GPU is refused too, before anything is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtrain.config import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto (CUDA when torch sees a GPU, else CPU), cpu or cuda"


class DeviceError(ConfigError):
    """The asked device cannot run this: the user's to fix (exit 2), not a crash."""


def resolve_device(choice: str, cpu_only: str | None = None) -> torch.device:
    """The device for ``choice``; ``cpu_only`` names why this work runs only on the CPU, if it does."""
    import torch  # here, not above: the CLIs import the choices before they may import torch

    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"--device {choice!r}: one of {', '.join(DEVICE_CHOICES)}")
    if choice == "cpu" or (choice == "auto" and (cpu_only or not torch.cuda.is_available())):
        return torch.device("cpu")
    if cpu_only:
        raise DeviceError(f"--device cuda: {cpu_only}; use --device cpu or auto")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU"
            f" (built for CUDA {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    return torch.device("cuda", torch.cuda.current_device())
