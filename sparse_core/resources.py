"""Will a stage fit in memory? A check before it starts, so that a too-large batch or model ends
in one clear error instead of the kernel's OOM kill (which leaves no message, and can take the
Prefect server or the user's session with it).

The estimate is deliberately simple and a lower bound of what training needs:

- activations: one forward pass of one example (zeros, eval mode, no gradients; no random
  numbers drawn, no state changed) measures the bytes of every leaf module's output. A
  training batch keeps all of them for the backward pass, counted twice (outputs and the
  inputs saved by BatchNorm/ReLU); an inference batch (no gradients) holds only a few at a
  time, counted as three times the largest. Each times its batch size; the largest term counts;
- parameters: float32 weights, gradients, momentum, masks and DPF's dense copy: 5 copies;
- the data already in memory is not counted (it is loaded when the check runs).

The estimate is compared with the memory available to this process: ``MemAvailable`` of
``/proc/meminfo``, capped by the cgroup limit (``/sys/fs/cgroup/memory.max``) when one is set;
on CUDA, the free device memory (``torch.cuda.mem_get_info``). Where neither can be read the
check passes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: Bytes kept per byte of forward activations during training (outputs + saved inputs).
TRAINING_ACTIVATION_FACTOR = 2
#: Float32 copies of the parameters during training: weights, gradients, momentum, masks, DPF's dense copy.
PARAMETER_COPIES = 5
#: Outputs alive at once in an inference pass, in units of the largest one.
INFERENCE_LIVE_OUTPUTS = 3
GIB = 2**30


class ResourceError(ValueError):
    """A stage would need more memory than the machine has available."""


def activation_bytes_per_example(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Bytes of all leaf modules' outputs, and of the largest one, for one example of shape
    ``input_shape`` (C, H, W), in float32 (bf16 autocast halves part of it: ignored).

    The pass runs in eval mode without gradients on zeros, so no random number is drawn and no
    BatchNorm statistic changes; the model's training flag is restored.
    """
    sizes: list[int] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * 4)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still use on ``device`` (None when it cannot be read)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_memory(stage: str, model: nn.Module, input_shape: tuple[int, ...], batches: dict[str, int],
                 device: torch.device, available: int | None = None) -> int:  # fmt: skip
    """Refuse ``stage`` when its estimated memory (module docstring) exceeds what is available.

    Args:
        stage: the stage, for the message (``train@dpf-0``).
        model: the model as built (its parameters count once per copy).
        input_shape: one example's shape (C, H, W).
        batches: ``{params key: batch size}`` of the batches the stage runs (training batches
            under key names containing ``optim``; the others run without gradients).
        device: where the stage runs.
        available: bytes available (default: :func:`available_bytes`).

    Returns:
        The estimate in bytes.

    Raises:
        ResourceError: the estimate exceeds the available memory; the message names the stage,
            the largest term's params key, both sizes, and what to lower.
    """
    total, largest = activation_bytes_per_example(model, input_shape)
    per_example = {key: total * TRAINING_ACTIVATION_FACTOR if "optim" in key else largest * INFERENCE_LIVE_OUTPUTS for key in batches}
    terms = {key: b * per_example[key] for key, b in batches.items()}
    params = sum(p.numel() for p in model.parameters()) * 4 * PARAMETER_COPIES
    key = max(terms, key=terms.get) if terms else None
    need = params + (terms[key] if key else 0)
    available = available_bytes(device) if available is None else available
    if available is not None and need > available:
        raise ResourceError(
            f"{stage}: needs about {need / GIB:.1f} GiB ({key} = {batches[key]} examples × "
            f"{per_example[key] / 2**20:.2f} MiB of activations each, plus {params / GIB:.2f} GiB of parameters and optimizer "
            f"state), but {available / GIB:.1f} GiB of {device.type} memory is available; lower {key}"
        )
    return need
