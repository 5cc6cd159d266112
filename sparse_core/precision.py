"""Mixed precision and memory format of training and evaluation (``base.precision``,
``base.channels_last``).

``fp32`` (default) runs every op in float32: bit-reproducible on one machine and thread count.
``bf16`` runs the forward pass and the loss under ``torch.autocast(device, torch.bfloat16)``:
matmuls and convolutions in bfloat16 (AVX512-BF16 / AMX on recent x86 CPUs, tensor cores on
GPUs), reductions and the loss in float32 (autocast's op lists). bf16 has float32's exponent
range, so no loss scaling is needed. ``fp16`` (CUDA only) is automatic mixed precision with a
dynamic loss scale (:class:`torch.amp.GradScaler`; Micikevicius et al. 2018, "Mixed Precision
Training", Sec. 3.2): the loss is multiplied by the scale before ``backward``, gradients are
unscaled before the method's hooks and the optimizer see them, and a step whose gradients
overflowed is skipped while the scale is halved.

In every mode the parameters ("master weights"), masks, DPF's dense copy, the optimizer
state and every exported artifact stay float32: autocast casts copies per op and never
touches the parameters.

``channels_last`` converts each input batch (B, C, H, W) to the channels-last (NHWC) memory
layout. Convolutions (oneDNN on CPU, cuDNN on GPU) pick their layout from the input, so the
activations of the whole network follow, while parameters, masks, gradients and optimizer
state keep PyTorch's standard contiguous layout. Converting the parameters too, as PyTorch's
memory-format tutorial does with ``model.to(memory_format=torch.channels_last)``, gave no
consistent gain on ResNet-20 here (one run while other jobs loaded the machine: fp32 434 against
395 ms per step, slower; bf16 133 against 142 ms, 7% faster; README "Speed"), and would make
every flat index into a weight (drop/grow, momentum resets, safetensors export) a copy instead
of a view; this module therefore leaves parameters alone.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PRECISIONS", "Precision", "FP32", "native_bf16_cpu"]

#: The values of ``base.precision``.
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How one process computes: ``name`` in :data:`PRECISIONS`, ``channels_last`` inputs.

    Raises:
        ValueError: an unknown ``name``, or ``fp16`` on a non-CUDA ``device_type`` (CPU fp16
            kernels are slow and CPU autocast has no loss scaling here; use ``bf16``).
    """

    name: str = "fp32"
    channels_last: bool = False
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"base.precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")
        if self.name == "fp16" and self.device_type != "cuda":
            raise ValueError(f"base.precision: fp16 needs a CUDA device (this run uses {self.device_type!r}); use bf16 on CPU")

    @classmethod
    def of(cls, base: Any, device: torch.device) -> "Precision":
        """The precision of ``base`` (a :class:`~sparse_core.config.BaseSection`) on ``device``.

        Warns (``RuntimeWarning``) for ``bf16`` on a CPU without native bf16 instructions
        (:func:`native_bf16_cpu`): torch's bf16 convolutions then leave oneDNN for its generic
        fallback kernels and the run is much slower than ``fp32``, not faster; the setting is
        kept, since it changes the results.
        """
        precision = cls(base.precision, base.channels_last, torch.device(device).type)
        if precision.name == "bf16" and precision.device_type == "cpu" and not native_bf16_cpu():
            warnings.warn(f"base.precision: bf16 on a CPU without AVX512-BF16 or AMX ({torch.backends.cpu.get_cpu_capability()}): "
                          "torch has no fast bf16 kernels here and runs its generic fallback, several times slower than fp32 "
                          "(sparseflow's stages refuse it unless base.allow_slow_bf16; sparse_core.fastpath measures it); "
                          "use base.precision: auto or fp32 on this machine", RuntimeWarning, stacklevel=2)  # fmt: skip
        return precision

    @property
    def dtype(self) -> torch.dtype:
        """The autocast compute dtype (float32 for ``fp32``)."""
        return _DTYPES.get(self.name, torch.float32)

    @property
    def scaled(self) -> bool:
        """Whether gradients are loss-scaled (fp16 only)."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass and the loss: autocast to :attr:`dtype`, or nothing."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) in the configured memory layout; other ranks unchanged."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def grad_scaler(self) -> "torch.amp.GradScaler":
        """A :class:`torch.amp.GradScaler`, enabled only for ``fp16`` (disabled: every call is a
        pass-through, ``scale(loss) is loss``)."""
        return torch.amp.GradScaler(self.device_type if self.scaled else "cpu", enabled=self.scaled)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as torch detects it.

    Without them, CPU autocast to bf16 still runs, but not on oneDNN: torch 2.14's profiler shows
    a bf16 ``Conv2d`` forward and backward as ``aten::_slow_conv2d_forward`` /
    ``aten::_slow_conv2d_backward`` (its generic im2col fallback) where fp32 runs
    ``aten::mkldnn_convolution``, on a 2-core AVX2 AMD EPYC. One training step of WRN-28-10
    (batch 16, channels_last) took 74-101 s there against 8-12 s in fp32, and ResNet-56
    1.7-1.9 s against 0.19-0.23 s (``/tmp`` script, 2026-12-01).

    torch's probes (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``) are
    private; where a torch version lacks them, the CPU flags the kernel reports are read instead
    (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``, Linux), and elsewhere the answer is
    False. The answer only decides a warning (and the profile smoke test's precision), never a
    result.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return bool(any(probe() for probe in probes))
    return bool(_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``path`` (Linux); empty where it is absent."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


#: Plain float32, standard layout: the default, bit-reproducible mode.
FP32 = Precision()
