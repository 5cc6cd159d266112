"""Export a trained run so that its sparsity pays at inference: ``compact``, ``sparse``, ``onnx``.

A run folder (``<runs_dir>/s<seed>/<run>/``, see :mod:`sparse_core.jobs.rundirs`) holds the masked
weights ``m ⊙ w`` (``model.safetensors``), the masks (``masks.safetensors``) and the resolved
params (``config.json``). The *masked model* is the registry network with those weights, in
eval mode; every export here computes the same function as the masked model.

Formats (each written atomically as one folder, ``<run folder>/export/<format>/`` by default):

``compact`` (structured runs: ``train.pruning.granularity: structured``, whole output filters
    masked, :func:`sparse_core.sparsity.filter_masks`). A physically smaller dense network:
    pruned output filters, their BatchNorm entries and the next layer's matching input
    channels are removed. Files: ``model.safetensors`` (fp32 parameters) and ``arch.json``
    (the layer list with kept widths and the original indices of the kept channels), rebuilt
    by :func:`load_compact` without the registry code. Like Torch-Pruning's dependency graph
    (Fang et al. 2023, "DepGraph"), channels coupled by a residual addition are removed
    together; unlike tools that prune by zeroing and then dropping, nothing is approximated:

    * A pruned filter does not output zero: it outputs its bias, and after BatchNorm and ReLU a
      per-channel *constant* ``c`` (``relu(beta - gamma·mu/sqrt(var+eps))`` for conv-BN; DPF and
      GMP keep training the BN parameters of pruned channels). The constant is folded into the
      next layer: into its bias for linear layers and unpadded convolutions; for a padded
      convolution, whose border outputs see fewer of the constant inputs, into a one-channel
      kernel ``K = Σ_k c_k W[:, k]`` whose response to an all-ones image is added to the output
      (:class:`ConstConv2d`; computed once per input size and cached). Where a BatchNorm follows,
      as in every conv of the networks here, that map is folded into the BatchNorm's shift
      (:meth:`ConstConv2d.forward_bn`), so it costs no pass of its own.
    * A residual bias (the constant a dead channel adds to the stream) is folded into the shift
      of the BatchNorm whose kept filter writes that stream channel, where there is one; only
      the remaining channels pay an extra pass.
    * Residual networks (:class:`~sparse_core.models.resnet_cifar.CifarResNet`): a block's output
      channels are tied to its shortcut, so the residual stream of a stage keeps the **union** of
      the channels written by a non-pruned filter anywhere in that stage (the stem or block
      ``conv2`` filters, and channels carried in by the shortcut of a stage's first block).
      A stream channel outside the union is constant through the stage and folded into its
      readers (each block's ``conv1``, the next shortcut, the classifier). Inside a block the
      inner convolution shrinks to the kept ``conv1`` filters. Shrinking only the inner
      convolution would be exact as well but leaves the stream at full width; keeping the
      union is the largest exact reduction. With the per-layer filter ranking of training
      (each layer prunes its own filters) the union of a stage is often nearly the full width;
      masks that prune the same stream channels in every layer of a stage (a plain narrower
      network) shrink the stream too.

``sparse`` (any pruning run; meant for unstructured ones). The registry network in which the
    conv/linear layers where compressed-sparse-row storage is *measured* faster than dense at
    export time are replaced by :class:`CSRLinear` / :class:`CSRConv2d` (weights stored as CSR
    ``crow_indices``, ``col_indices``, ``values``). Decision rule: a layer goes sparse only if
    CSR takes at most ``1/min_speedup`` of the dense time at every measured batch size (median
    of interleaved rounds; :func:`time_layers`). Files: ``model.safetensors`` (dense layers as
    dense tensors, CSR layers as their three tensors), ``sparse.json`` (model name and kwargs,
    input shape, the per-layer timings and decisions), rebuilt by :func:`load_sparse`.

``onnx`` (both). The compact network (structured runs) or the masked network (other runs) as
    ``model.onnx`` with a dynamic batch axis (``torch.onnx.export(dynamo=True)``), checked with
    onnxruntime against PyTorch when onnxruntime is importable (``onnx.json`` records the
    largest difference, or that the check was skipped).

Errors: :class:`ExportError` (a ``ValueError``) names the run folder, the file or setting, and
what was expected; a missing file is a ``FileNotFoundError``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_core import artifacts

FORMATS = ("compact", "sparse", "onnx")
COMPACT_FORMAT = "sparseflow.compact"
SPARSE_FORMAT = "sparseflow.sparse"
FORMAT_VERSION = 1
#: Largest |compact - masked| (fp32 logits) accepted by :func:`export_compact`'s self-check.
COMPACT_ATOL = 1e-5
#: Largest |onnxruntime - PyTorch| accepted by :func:`export_onnx`'s check.
ONNX_ATOL = 1e-4


class ExportError(ValueError):
    """A run cannot be exported in the asked format (message names the run, file or setting)."""


# ===== the run ================================================================================
@dataclass
class LoadedRun:
    """A trained run rebuilt as its masked model.

    Attributes:
        folder: the run folder.
        model: the registry network with ``m ⊙ w`` loaded, eval mode, CPU, fp32.
        masks: ``{"<module>.weight": bool tensor}`` (empty for a dense run).
        input_shape: ``(C, H, W)`` of one example.
        num_classes: classifier outputs.
        model_name, model_kwargs: the registry entry and its keyword arguments.
        method, granularity: from ``config.json``.
    """

    folder: Path
    model: nn.Module
    masks: dict[str, torch.Tensor]
    input_shape: tuple[int, int, int]
    num_classes: int
    model_name: str
    model_kwargs: dict[str, Any]
    method: str
    granularity: str
    config: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name


def _data_shape(folder: Path, cfg: dict[str, Any]) -> tuple[tuple[int, int, int], int]:
    """``(C, H, W)`` and the class count, from the prepared data the run trained on."""
    from sparse_core.artifacts import parquet_metadata

    file = (cfg.get("data") or {}).get("file")
    if not file:
        raise ExportError(f"{folder / 'config.json'}: no data.file entry; cannot tell the model's input shape")
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: prepared data of run {folder.name!r} missing (needed for its input shape); "
            "run the prepare stage (dvc repro prepare) or pass input_shape and num_classes"
        )
    meta = parquet_metadata(path)
    try:
        shape = (int(meta["channels"]), int(meta["height"]), int(meta["width"]))
        classes = len(json.loads(meta["classes"]))
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{path}: prepared-data metadata lacks or garbles {exc}; run the prepare stage again") from None
    return shape, classes


def load_run(
    folder: str | Path, input_shape: tuple[int, int, int] | None = None, num_classes: int | None = None
) -> LoadedRun:
    """Rebuild a run's masked model from its folder.

    Args:
        folder: run folder with ``config.json``, ``model.safetensors`` and (pruning runs)
            ``masks.safetensors``.
        input_shape, num_classes: ``(C, H, W)`` and class count; default: read from the
            prepared data file named in ``config.json`` (``data.file``).

    Raises:
        FileNotFoundError: the folder, ``config.json``, ``model.safetensors`` or the prepared
            data is missing.
        ExportError: ``config.json`` lacks the model entry, or the weights/masks do not fit
            the configured model.
    """
    from sparse_core.models import create_model

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; the run {folder.name!r} has not finished (no config.json)")
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing; the run {folder.name!r} has not exported its model")
    try:
        cfg = artifacts.read_json(cfg_path)
        params = cfg["params"]
        model_name, model_kwargs = params["model"]["name"], dict(params["model"].get("kwargs") or {})
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{cfg_path}: not a run config with params.model.name ({exc})") from None
    granularity = ((params.get("train") or {}).get("pruning") or {}).get("granularity", "unstructured")
    if input_shape is None or num_classes is None:
        shape, classes = _data_shape(folder, cfg)
        input_shape, num_classes = input_shape or shape, num_classes or classes
    c, h, w = input_shape
    if h != w:
        raise ExportError(f"{folder}: registry models take square images, the data is {h}x{w}")
    try:
        model = create_model(model_name, in_channels=c, num_classes=num_classes, image_size=h, **model_kwargs)
    except (KeyError, TypeError) as exc:
        raise ExportError(f"{cfg_path}: cannot build model {model_name!r} with {model_kwargs}: {exc}") from None
    try:
        artifacts.load_weights(model, weights_path)
    except RuntimeError as exc:
        raise ExportError(f"{weights_path}: weights do not fit model {model_name!r}: {str(exc).splitlines()[0]}") from None
    masks: dict[str, torch.Tensor] = {}
    if (folder / "masks.safetensors").is_file():
        masks = {k: v.bool() for k, v in artifacts.load_tensors(folder / "masks.safetensors").items()}
        params_by_name = dict(model.named_parameters())
        for n, m in masks.items():
            if n not in params_by_name or params_by_name[n].shape != m.shape:
                raise ExportError(f"{folder / 'masks.safetensors'}: mask {n!r} does not fit model {model_name!r}")
    model.eval()
    return LoadedRun(folder, model, masks, tuple(input_shape), int(num_classes), model_name, model_kwargs,
                     str(cfg.get("method", "?")), str(granularity), cfg)  # fmt: skip


def is_filter_structured(masks: dict[str, torch.Tensor]) -> bool:
    """True when every mask is constant over each output filter (row) and some mask prunes."""
    if not masks:
        return False
    for m in masks.values():
        rows = m.flatten(1)
        if not bool((rows.all(1) | ~rows.any(1)).all()):
            return False
    return any(not bool(m.all()) for m in masks.values())


# ===== compact modules ========================================================================
class ConstConv2d(nn.Conv2d):
    """``nn.Conv2d`` plus the exact response to removed input channels that held constants.

    With removed channels ``k`` at constant values ``c_k`` and ``K = Σ_k c_k W[:, k]`` of shape
    ``(C_out, 1, kh, kw)`` (buffer ``const_kernel``), the output is
    ``conv(x, W_kept) + conv(ones(1, 1, H, W), K)``: zero padding makes the second term vary at
    the borders, so it cannot be folded into the bias. The second term depends only on
    ``(H, W)`` and is cached (eager mode; recomputed while tracing or exporting).
    """

    def __init__(self, *args: Any, const_kernel: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.has_const = const_kernel
        if const_kernel:
            self.register_buffer("const_kernel", torch.zeros(self.out_channels, 1, *self.kernel_size))
        self._cache: dict[tuple, torch.Tensor] = {}
        self._bn_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _tracing() -> bool:
        """Tracing, compiling or exporting: nothing is cached (the graph must compute the maps)."""
        return (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or torch.onnx.is_in_onnx_export())  # fmt: skip

    def _response(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(ones(1, 1, H, W), K)`` in fp32 (autocast off): ``(1, C_out, H', W')``."""
        ones = torch.ones(1, 1, x.shape[-2], x.shape[-1], device=x.device, dtype=self.const_kernel.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(ones, self.const_kernel, None, self.stride, self.padding, self.dilation)

    def _const_map(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`_response` cast to ``dtype``, cached per input size while ``K`` is unchanged."""
        tracing = self._tracing()
        key = (x.shape[-2], x.shape[-1], x.device, dtype, self.const_kernel._version)
        if not tracing and key in self._cache:
            return self._cache[key]
        out = self._response(x).to(dtype)
        if not tracing:
            self._cache = {key: out}
        return out

    def forward(self, x: torch.Tensor, plain: bool = False) -> torch.Tensor:
        """``conv(x, W) + conv(ones, K)``; ``plain``: the first term only (:meth:`forward_bn` adds
        the second through the BatchNorm)."""
        y = super().forward(x)
        if self.has_const and not plain:
            y = y + self._const_map(x, y.dtype)
        return y

    def forward_bn(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """``bn(self(x))``, with the constant map folded into the BatchNorm in eval mode.

        Eval BatchNorm is ``z·s + (β - μ·s)`` with ``s = γ / sqrt(σ² + ε)``, so with ``z = y + M``
        (``M`` the constant map) it is ``y·s + (M·s + β - μ·s)``: one ``addcmul`` over the output
        with a cached ``(1, C_out, H', W')`` shift, instead of an add pass and a BatchNorm pass.
        A compact layer then makes as many passes over its output as a plain narrower one. Batch
        statistics (training mode) keep the two steps.
        """
        if not self.has_const or bn.training or not bn.track_running_stats:
            return bn(self(x))
        y = self(x, plain=True)  # through __call__: forward hooks (FLOPs counters, profilers) still see the conv
        scale, shift = self._folded(x, y.dtype, bn)
        return torch.addcmul(shift, y, scale)

    def _folded(self, x: torch.Tensor, dtype: torch.dtype, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, M·s + β - μ·s)`` of :meth:`forward_bn`, shapes ``(1, C, 1, 1)`` and ``(1, C, H', W')``,
        computed in fp32 and cast to ``dtype``; cached while no tensor they come from changes
        (the key holds the tensors' version counters, which in-place loads bump)."""
        tracing = self._tracing()
        tensors = [t for t in (self.const_kernel, bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
        key = (x.shape[-2], x.shape[-1], x.device, dtype, *(t._version for t in tensors))
        if not tracing and key in self._bn_cache:
            return self._bn_cache[key]
        m = self._response(x)
        s = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            s = s * bn.weight
        b = -bn.running_mean * s + (bn.bias if bn.bias is not None else 0)
        out = (s.view(1, -1, 1, 1).to(dtype), (m * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).to(dtype))
        if not tracing:
            self._bn_cache = {key: out}
        return out

    def _apply(self, fn, recurse=True):  # .to() / .half(): cached maps are stale
        self._cache, self._bn_cache = {}, {}
        return super()._apply(fn, recurse)


class Gather(nn.Module):
    """Place ``C_in`` channels into ``C_out`` positions: ``out[:, p] = x[:, index[p]]`` with
    ``index[p] == C_in`` meaning a zero channel. Optional stride-2 subsampling first (option-A
    shortcut of He et al. 2016)."""

    def __init__(self, index: list[int], in_channels: int, subsample: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.subsample = subsample
        self.needs_zero = any(i == in_channels for i in index)
        self.identity = (not self.needs_zero) and index == list(range(in_channels))
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subsample:
            x = x[:, :, ::2, ::2]
        if self.identity:
            return x
        if self.needs_zero:
            x = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], 1)
        return x.index_select(1, self.index)


class CompactBlock(nn.Module):
    """``relu(shortcut(x) + place(bn2(conv2(relu(bn1(conv1(x)))))) + bias)`` at kept widths."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        cin, inner, k2, cout, s = spec["in"], spec["inner"], spec["conv2_out"], spec["out"], spec["stride"]
        self.conv1 = ConstConv2d(cin, inner, 3, s, 1, bias=False, const_kernel=spec["conv1_const"])
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = ConstConv2d(inner, k2, 3, 1, 1, bias=False, const_kernel=spec["conv2_const"])
        self.bn2 = nn.BatchNorm2d(k2)
        self.place = Gather(spec["place"], k2)
        self.shortcut = Gather(spec["shortcut"], cin, subsample=s != 1)
        self.has_bias = spec["residual_bias"]
        if self.has_bias:
            self.register_buffer("residual_bias", torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1.forward_bn(x, self.bn1))
        out = self.place(self.conv2.forward_bn(out, self.bn2)) + self.shortcut(x)
        if self.has_bias:
            out = out + self.residual_bias.view(1, -1, 1, 1).to(out.dtype)
        return F.relu(out)


class CompactResNet(nn.Module):
    """Compact CIFAR ResNet rebuilt from ``arch["stem"]``, ``arch["blocks"]``, ``arch["fc"]``.

    Input ``(B, C, H, W)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        st = arch["stem"]
        self.conv1 = ConstConv2d(st["in"], st["out"], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(st["out"])
        self.place = Gather(st["place"], st["out"])
        self.has_bias = st["residual_bias"]
        if self.has_bias:
            self.register_buffer("residual_bias", torch.zeros(st["stream"]))
        self.layers = nn.Sequential(*[CompactBlock(b) for b in arch["blocks"]])
        self.fc = nn.Linear(arch["fc"]["in"], arch["fc"]["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.place(self.conv1.forward_bn(x, self.bn1))
        if self.has_bias:
            x = x + self.residual_bias.view(1, -1, 1, 1).to(x.dtype)
        x = self.layers(F.relu(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CompactSequential(nn.Sequential):
    """``nn.Sequential`` (same parameter names) whose ``ConstConv2d`` → ``BatchNorm2d`` pairs run
    as :meth:`ConstConv2d.forward_bn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        i = 0
        while i < len(mods):
            if isinstance(mods[i], ConstConv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
                x = mods[i].forward_bn(x, mods[i + 1])
                i += 2
            else:
                x = mods[i](x)
                i += 1
        return x


def _sequential_from_arch(arch: dict[str, Any]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for op in arch["layers"]:
        kind = op["op"]
        if kind == "conv":
            mods.append(ConstConv2d(op["in"], op["out"], op["kernel"], op["stride"], op["padding"],
                                    bias=op["bias"], const_kernel=op["const"]))  # fmt: skip
        elif kind == "linear":
            mods.append(nn.Linear(op["in"], op["out"], bias=op["bias"]))
        elif kind == "bn":
            mods.append(nn.BatchNorm2d(op["features"], eps=op["eps"]))
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "maxpool":
            mods.append(nn.MaxPool2d(op["kernel"], op["stride"]))
        elif kind == "avgpool":
            mods.append(nn.AdaptiveAvgPool2d(1))
        elif kind == "flatten":
            mods.append(nn.Flatten(1))
        else:
            raise ExportError(f"arch.json: unknown layer op {kind!r}")
    return CompactSequential(*mods)


def build_compact(arch: dict[str, Any]) -> nn.Module:
    """The compact module described by ``arch`` (parameters uninitialised: load them).

    Raises:
        ExportError: not a compact architecture of a known kind or version.
    """
    if arch.get("format") != COMPACT_FORMAT or arch.get("version") != FORMAT_VERSION:
        raise ExportError(f"arch.json: expected format {COMPACT_FORMAT!r} version {FORMAT_VERSION}, "
                          f"got {arch.get('format')!r} version {arch.get('version')!r}")  # fmt: skip
    if arch["kind"] == "cifar_resnet":
        return CompactResNet(arch)
    if arch["kind"] == "sequential":
        return _sequential_from_arch(arch)
    raise ExportError(f"arch.json: unknown kind {arch['kind']!r} (known: cifar_resnet, sequential)")


# ===== compaction =============================================================================
def _kept_rows(w: torch.Tensor) -> torch.Tensor:
    """Indices of output filters (rows) with any nonzero weight; at least one is kept so no
    layer has width 0 (a zero filter kept computes its bias, exactly as the masked model)."""
    kept = torch.nonzero(w.flatten(1).ne(0).any(1)).flatten()
    return kept if kept.numel() else torch.zeros(1, dtype=torch.long)


def _complement(n: int, kept: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    return torch.nonzero(~keep).flatten()


def _bn_const(bn: nn.BatchNorm2d, c: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN applied to per-channel constants ``c`` (shape ``(C,)``)."""
    scale = (bn.running_var + bn.eps).rsqrt()
    g = bn.weight if bn.weight is not None else torch.ones_like(scale)
    b = bn.bias if bn.bias is not None else torch.zeros_like(scale)
    return (c - bn.running_mean) * scale * g + b


def _bn_sub(bn: nn.BatchNorm2d, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    sd = {"running_mean": bn.running_mean[idx], "running_var": bn.running_var[idx],
          "num_batches_tracked": bn.num_batches_tracked.clone()}  # fmt: skip
    if bn.weight is not None:
        sd["weight"], sd["bias"] = bn.weight[idx], bn.bias[idx]
    return sd


def _conv_sub(conv: nn.Conv2d, alive_in: torch.Tensor, const_in: torch.Tensor, kept_out: torch.Tensor):
    """Weight, bias and constant kernel of ``conv`` restricted to ``alive_in`` -> ``kept_out``.

    ``const_in`` (``(C_in,)``) holds the constant values of the removed input channels.
    Returns ``(weight, bias or None, const_kernel or None)``.
    """
    w = conv.weight.detach()
    dead = _complement(w.shape[1], alive_in)
    bias = conv.bias.detach()[kept_out].clone() if conv.bias is not None else None
    kernel = None
    if dead.numel() and bool(const_in[dead].ne(0).any()):
        contrib = (w[kept_out][:, dead] * const_in[dead].view(1, -1, 1, 1)).sum(1, keepdim=True)
        if all(p == 0 for p in conv.padding):  # every output sees the whole kernel: a bias
            extra = contrib.sum((1, 2, 3))
            bias = extra if bias is None else bias + extra
        else:
            kernel = contrib
    return w[kept_out][:, alive_in].clone(), bias, kernel


def _conv_op(conv: nn.Conv2d, name: str, weight, bias, kernel, kept_out) -> tuple[dict, dict]:
    op = {"op": "conv", "name": name, "in": weight.shape[1], "out": weight.shape[0],
          "kernel": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
          "bias": bias is not None, "const": kernel is not None, "kept": kept_out.tolist()}  # fmt: skip
    sd = {"weight": weight}
    if bias is not None:
        sd["bias"] = bias
    if kernel is not None:
        sd["const_kernel"] = kernel
    return op, sd


def _chain(model: nn.Module) -> list[tuple[str, nn.Module | None, str]]:
    """``[(op, module, name)]`` whose composition is ``model.forward`` (checked by the caller)."""
    from sparse_core.models.small import LeNet5, LeNet300100
    from sparse_core.models.vgg import VGG

    mp = nn.MaxPool2d(2)
    if isinstance(model, LeNet5):
        return [("conv", model.conv1, "conv1"), ("relu", None, ""), ("maxpool", mp, ""),
                ("conv", model.conv2, "conv2"), ("relu", None, ""), ("maxpool", mp, ""), ("flatten", None, ""),
                ("linear", model.fc1, "fc1"), ("relu", None, ""), ("linear", model.fc2, "fc2"), ("relu", None, ""),
                ("linear", model.fc3, "fc3")]  # fmt: skip
    if isinstance(model, LeNet300100):
        return [("flatten", None, ""), ("linear", model.fc1, "fc1"), ("relu", None, ""), ("linear", model.fc2, "fc2"),
                ("relu", None, ""), ("linear", model.fc3, "fc3")]  # fmt: skip
    if isinstance(model, VGG):
        out = []
        for i, m in enumerate(model.features):
            kind = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.ReLU: "relu", nn.MaxPool2d: "maxpool"}.get(type(m))
            if kind is None:
                raise ExportError(f"VGG layer {type(m).__name__} has no compact form")
            out.append((kind, m, f"features.{i}"))
        return out + [("avgpool", None, ""), ("flatten", None, ""), ("linear", model.classifier, "classifier")]
    raise ExportError(f"compact export supports CIFAR ResNets, LeNet-5, LeNet-300-100 and VGG; not {type(model).__name__}")


def _run_chain(chain, x: torch.Tensor) -> torch.Tensor:
    for kind, m, _ in chain:
        if kind == "relu":
            x = F.relu(x)
        elif kind == "flatten":
            x = torch.flatten(x, 1)
        elif kind == "avgpool":
            x = F.adaptive_avg_pool2d(x, 1)
        else:
            x = m(x)
    return x


@torch.no_grad()
def _compact_sequential(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[dict, dict[str, torch.Tensor]]:
    chain = _chain(model)
    probe = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    if not torch.allclose(_run_chain(chain, probe), model(probe), atol=1e-6):
        raise ExportError(f"internal: the layer chain of {type(model).__name__} does not reproduce its forward")
    # Activation shapes at every op, for flatten (channel -> features) bookkeeping.
    shapes, x = [], torch.zeros(1, *input_shape)
    for op in chain:
        shapes.append(tuple(x.shape[1:]))
        x = _run_chain([op], x)
    last_linear = max(i for i, (k, _, _) in enumerate(chain) if k in ("conv", "linear"))
    c0 = input_shape[0]
    alive, const = torch.arange(c0), torch.zeros(c0)
    layers, sd = [], {}
    for i, ((kind, m, name), shape) in enumerate(zip(chain, shapes)):
        if kind in ("conv", "linear"):
            kept = torch.arange(m.weight.shape[0]) if i == last_linear else _kept_rows(m.weight.detach())
            if kind == "conv":
                w, b, k = _conv_sub(m, alive, const, kept)
                op, tensors = _conv_op(m, name, w, b, k, kept)
            else:
                wfull = m.weight.detach()
                dead = _complement(wfull.shape[1], alive)
                b = m.bias.detach()[kept].clone() if m.bias is not None else None
                if dead.numel() and bool(const[dead].ne(0).any()):
                    extra = wfull[kept][:, dead] @ const[dead]
                    b = extra if b is None else b + extra
                w = wfull[kept][:, alive].clone()
                op = {"op": "linear", "name": name, "in": w.shape[1], "out": w.shape[0], "bias": b is not None,
                      "kept": kept.tolist()}  # fmt: skip
                tensors = {"weight": w, **({"bias": b} if b is not None else {})}
            # A pruned filter's output: its bias (its weights are all zero).
            const = m.bias.detach().clone() if m.bias is not None else torch.zeros(m.weight.shape[0])
            alive = kept
        elif kind == "bn":
            op, tensors = {"op": "bn", "name": name, "features": len(alive), "eps": m.eps}, _bn_sub(m, alive)
            const = _bn_const(m, const)
        elif kind == "relu":
            op, tensors, const = {"op": "relu"}, {}, F.relu(const)
        elif kind == "maxpool":
            op, tensors = {"op": "maxpool", "kernel": m.kernel_size, "stride": m.stride}, {}
        elif kind == "avgpool":
            op, tensors = {"op": "avgpool"}, {}
        else:  # flatten: channel c of (C, H, W) becomes features c·HW .. c·HW + HW - 1
            hw = math.prod(shape[1:]) if len(shape) == 3 else 1
            alive = (alive.view(-1, 1) * hw + torch.arange(hw).view(1, -1)).flatten()
            const = const.repeat_interleave(hw)
            op, tensors = {"op": "flatten"}, {}
        sd.update({f"{len(layers)}.{k}": v for k, v in tensors.items()})
        layers.append(op)
    return {"kind": "sequential", "layers": layers}, sd


@torch.no_grad()
def _compact_resnet(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Compaction of :class:`~sparse_core.models.resnet_cifar.CifarResNet` (see module docstring)."""
    from sparse_core.models.resnet_cifar import _PadShortcut

    blocks = list(model.layers)
    # 1. Which stream channels vary (are not constant) after each writer: stem, then each block.
    stem_kept = _kept_rows(model.conv1.weight)
    alive_after: list[set[int]] = []
    cur = set(stem_kept.tolist())
    alive_after.append(cur)
    shifts = []
    for blk in blocks:
        k2 = set(_kept_rows(blk.conv2.weight).tolist())
        if isinstance(blk.shortcut, _PadShortcut):
            lo = blk.shortcut.pad // 2
            shifts.append(lo)
            carried = {i + lo for i in cur}
        else:
            shifts.append(None)
            carried = set(cur)
        cur = k2 | carried
        alive_after.append(cur)
    # 2. The stream of a stage keeps what varies anywhere in the stage (monotone: its last writer).
    stage_of = [0]  # writer index -> stage id; stem is writer 0
    for s in shifts:
        stage_of.append(stage_of[-1] + (1 if s is not None else 0))
    last_of_stage = {st: max(i for i, x in enumerate(stage_of) if x == st) for st in set(stage_of)}
    stream = [torch.tensor(sorted(alive_after[last_of_stage[stage_of[i]]]), dtype=torch.long) for i in range(len(stage_of))]

    def place_index(kept: torch.Tensor, target: torch.Tensor) -> list[int]:
        pos = {int(c): p for p, c in enumerate(kept.tolist())}
        return [pos.get(int(c), len(kept)) for c in target.tolist()]

    sd: dict[str, torch.Tensor] = {}
    # Stem: stream = relu(place(bn(conv(x))) + bias); a pruned stem filter gives bn(0).
    w1 = model.conv1.weight.detach()
    s0 = stream[0]
    bn0 = _bn_const(model.bn1, torch.zeros(w1.shape[0]))
    sd["conv1.weight"] = w1[stem_kept].clone()
    sd.update({f"bn1.{k}": v for k, v in _bn_sub(model.bn1, stem_kept).items()})
    bias = torch.zeros(len(s0))
    in_stem = set(stem_kept.tolist())
    for p, c in enumerate(s0.tolist()):
        if c not in in_stem:
            bias[p] = bn0[c]
    stem_bias = bool(bias.ne(0).any())
    if stem_bias:
        sd["residual_bias"] = bias
    const = F.relu(bn0)  # values of the stream channels left out of the stage (full width)
    arch_stem = {"in": w1.shape[1], "out": len(stem_kept), "stream": len(s0), "place": place_index(stem_kept, s0),
                 "residual_bias": stem_bias, "kept": stem_kept.tolist(), "stream_kept": s0.tolist()}  # fmt: skip
    arch_blocks = []
    for b, blk in enumerate(blocks):
        s_in, s_out, lo = stream[b], stream[b + 1], shifts[b]
        pre = f"layers.{b}."
        kept1, kept2 = _kept_rows(blk.conv1.weight), _kept_rows(blk.conv2.weight)
        cw1, _, k1 = _conv_sub(blk.conv1, s_in, const, kept1)
        inner_const = F.relu(_bn_const(blk.bn1, torch.zeros(blk.conv1.weight.shape[0])))
        cw2, _, k2 = _conv_sub(blk.conv2, kept1, inner_const, kept2)
        sd[pre + "conv1.weight"], sd[pre + "conv2.weight"] = cw1, cw2
        if k1 is not None:
            sd[pre + "conv1.const_kernel"] = k1
        if k2 is not None:
            sd[pre + "conv2.const_kernel"] = k2
        sd.update({pre + f"bn1.{k}": v for k, v in _bn_sub(blk.bn1, kept1).items()})
        sd.update({pre + f"bn2.{k}": v for k, v in _bn_sub(blk.bn2, kept2).items()})
        c_out = blk.conv2.weight.shape[0]
        bn2_zero = _bn_const(blk.bn2, torch.zeros(c_out))
        # Shortcut: source channel of every output channel (full width) and its constant if dead.
        src = torch.arange(c_out) - (lo or 0)
        valid = (src >= 0) & (src < len(const))
        sc_const = torch.zeros(c_out)
        sc_const[valid] = const[src[valid]]
        pos_in = {int(c): p for p, c in enumerate(s_in.tolist())}
        shortcut_idx, bias = [], torch.zeros(len(s_out))
        kept2_set = set(kept2.tolist())
        for p, c in enumerate(s_out.tolist()):
            sc = int(src[c])
            if bool(valid[c]) and sc in pos_in:
                shortcut_idx.append(pos_in[sc])
            else:
                shortcut_idx.append(len(s_in))
                bias[p] += sc_const[c]
            if c not in kept2_set:
                bias[p] += bn2_zero[c]
        # A stream channel written by a kept conv2 filter takes its bias through bn2's shift
        # (exact: bn2's output is only added); only the others need the residual-bias pass.
        placed = place_index(kept2, s_out)
        if pre + "bn2.bias" in sd:
            for p, q in enumerate(placed):
                if q < len(kept2) and bool(bias[p] != 0):
                    sd[pre + "bn2.bias"][q] += bias[p]
                    bias[p] = 0.0
        has_bias = bool(bias.ne(0).any())
        if has_bias:
            sd[pre + "residual_bias"] = bias
        arch_blocks.append({
            "in": len(s_in), "inner": len(kept1), "conv2_out": len(kept2), "out": len(s_out),
            "stride": blk.conv1.stride[0], "conv1_const": k1 is not None, "conv2_const": k2 is not None,
            "place": placed, "shortcut": shortcut_idx, "residual_bias": has_bias,
            "kept": {"conv1": kept1.tolist(), "conv2": kept2.tolist(), "stream": s_out.tolist()},
        })  # fmt: skip
        const = F.relu(bn2_zero + sc_const)  # only read at channels outside s_out
    fw, fb = model.fc.weight.detach(), model.fc.bias.detach()
    s_last = stream[-1]
    dead = _complement(fw.shape[1], s_last)
    sd["fc.weight"] = fw[:, s_last].clone()
    sd["fc.bias"] = fb + (fw[:, dead] @ const[dead] if dead.numel() else 0.0)
    arch = {"kind": "cifar_resnet", "stem": arch_stem, "blocks": arch_blocks,
            "fc": {"in": len(s_last), "out": fw.shape[0]}}  # fmt: skip
    return arch, sd


def compact_model(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Module, dict[str, Any]]:
    """The compact equivalent of a masked model (eval mode).

    Filters whose weights are all zero (masked ``m ⊙ w``) are removed with their BN entries and
    the next layers' inputs; their constant outputs are folded exactly (module docstring).

    Args:
        model: registry network (CIFAR ResNet, LeNet-5, LeNet-300-100, VGG) holding ``m ⊙ w``.
        input_shape: ``(C, H, W)`` of one example.

    Returns:
        ``(compact module in eval mode, arch dict)``; ``arch`` has ``format``, ``version``,
        ``kind``, ``input_shape``, ``num_classes`` and per layer the kept widths and indices.

    Raises:
        ExportError: a model class without a compact form (e.g. WRN).
    """
    from sparse_core.models.resnet_cifar import CifarResNet

    model = model.eval()
    if isinstance(model, CifarResNet):
        body, sd = _compact_resnet(model)
    else:
        body, sd = _compact_sequential(model, input_shape)
    with torch.no_grad():
        classes = int(model(torch.zeros(1, *input_shape)).shape[1])
    arch = {"format": COMPACT_FORMAT, "version": FORMAT_VERSION, "input_shape": list(input_shape),
            "num_classes": classes, **body}  # fmt: skip
    compact = build_compact(arch)
    compact.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True)
    return compact.eval(), arch


def save_compact(compact: nn.Module, arch: dict[str, Any], folder: str | Path) -> Path:
    """Write ``model.safetensors`` + ``arch.json`` into ``folder`` (atomically, as one folder)."""
    folder = Path(folder)
    with artifacts.atomic_dir(folder, holds=("model.safetensors", "arch.json"), owner="export (compact)") as tmp:
        artifacts.save_tensors(compact.state_dict(), tmp / "model.safetensors")
        artifacts.write_json(arch, tmp / "arch.json")
    return folder


def load_compact(folder: str | Path) -> nn.Module:
    """Rebuild a compact export (eval mode, CPU, fp32) from ``arch.json`` + ``model.safetensors``.

    Raises:
        FileNotFoundError: a file is missing.
        ExportError: ``arch.json`` is not a compact architecture, or the weights do not fit it.
    """
    folder = Path(folder)
    arch = artifacts.read_json(folder / "arch.json")
    module = build_compact(arch)
    try:
        module.load_state_dict(artifacts.load_tensors(folder / "model.safetensors"), strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{folder / 'model.safetensors'}: does not fit arch.json: {str(exc).splitlines()[0]}") from None
    return module.eval()


# ===== sparse (CSR) modules ===================================================================
class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` (out, in) in CSR storage: ``addmm(b, W, xᵀ)ᵀ``.

    Input ``(B, in)`` -> ``(B, out)``. Buffers ``crow_indices``, ``col_indices``, ``values``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        with warnings.catch_warnings():  # "CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.shape = tuple(weight.shape)
        self.register_buffer("crow_indices", csr.crow_indices().clone())
        self.register_buffer("col_indices", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._w: torch.Tensor | None = None

    def weight_csr(self) -> torch.Tensor:
        if self._w is None or self._w.values().data_ptr() != self.values.data_ptr():
            with warnings.catch_warnings():  # invariants hold: the indices come from to_sparse_csr
                warnings.simplefilter("ignore", UserWarning)
                self._w = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.shape)
        return self._w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_csr()
        x2 = x.reshape(-1, x.shape[-1]).to(self.values.dtype)
        if self.bias is not None:
            y = torch.addmm(self.bias.unsqueeze(1), w, x2.t()).t()
        else:
            y = torch.mm(w, x2.t()).t()
        return y.reshape(*x.shape[:-1], self.shape[0])


class CSRConv2d(nn.Module):
    """Convolution as CSR ``W`` (out, in·kh·kw) times the unfolded input (im2col).

    Input ``(B, C, H, W)`` -> ``(B, out, H', W')``; same stride/padding/dilation as the dense layer.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1:
            raise ExportError(f"CSR storage for grouped convolutions is not supported (groups={conv.groups})")
        self.lin = CSRLinear(conv.weight.detach().flatten(1), conv.bias)
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C·k·k, L)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = self.lin(cols.transpose(1, 2))  # (B, L, out)
        return y.transpose(1, 2).reshape(b, self.out_channels, ho, wo)


def _csr_module(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Linear):
        return CSRLinear(module.weight, module.bias)
    if isinstance(module, nn.Conv2d):
        return CSRConv2d(module)
    raise ExportError(f"no CSR form for {type(module).__name__}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@dataclass
class LayerTiming:
    """Median seconds per call of one layer, dense vs CSR, at one batch size (and the spread)."""

    layer: str
    batch: int
    dense_s: float
    csr_s: float
    dense_spread: float
    csr_spread: float
    density: float

    @property
    def speedup(self) -> float:
        """Dense time / CSR time (> 1: CSR faster)."""
        return self.dense_s / self.csr_s


def _median_spread(xs: list[float]) -> tuple[float, float]:
    med = statistics.median(xs)
    return med, (max(xs) - min(xs)) / med if med > 0 else 0.0


@torch.no_grad()
def time_layers(
    model: nn.Module, input_shape: tuple[int, int, int], layers: Iterable[str], batch_sizes: Iterable[int] = (1, 256),
    rounds: int = 5, min_time_s: float = 0.01,
) -> list[LayerTiming]:
    """Time each named conv/linear layer dense vs CSR on its own real input.

    The input of every layer is captured from one forward pass of random normal examples at each
    batch size; then, per layer, ``rounds`` interleaved rounds (dense, CSR, dense, CSR, ...) each
    repeat the call until ``min_time_s`` has passed. Reported: median seconds per call, spread
    ``(max - min) / median``.

    Returns:
        One :class:`LayerTiming` per (layer, batch size).
    """
    layers = list(layers)
    modules = dict(model.named_modules())
    out: list[LayerTiming] = []
    model.eval()
    for bs in batch_sizes:
        captured: dict[str, torch.Tensor] = {}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, i[0].detach()))
                 for n in layers]  # fmt: skip
        try:
            model(torch.randn(bs, *input_shape, generator=torch.Generator().manual_seed(bs)))
        finally:
            for h in hooks:
                h.remove()
        for n in layers:
            dense, csr, x = modules[n], _csr_module(modules[n]), captured[n]
            density = float(dense.weight.ne(0).float().mean())
            fns = {"dense": lambda: dense(x), "csr": lambda: csr(x)}
            reps = {}
            for k, f in fns.items():  # warm-up and calibrate repetitions per round
                f()
                t0, r = time.perf_counter(), 0
                while time.perf_counter() - t0 < min_time_s / 4 or r == 0:
                    f()
                    r += 1
                reps[k] = max(1, int(r * 4 * min_time_s / max(time.perf_counter() - t0, 1e-9) / 4))
            times: dict[str, list[float]] = {"dense": [], "csr": []}
            for _ in range(rounds):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(reps[k]):
                        f()
                    times[k].append((time.perf_counter() - t0) / reps[k])
            (dm, ds), (cm, cs) = _median_spread(times["dense"]), _median_spread(times["csr"])
            out.append(LayerTiming(n, bs, dm, cm, ds, cs, density))
    return out


def choose_csr_layers(timings: list[LayerTiming], min_speedup: float = 1.1) -> list[str]:
    """Layers whose CSR form is at least ``min_speedup`` times faster than dense at every timed
    batch size (the export's decision rule)."""
    by_layer: dict[str, list[LayerTiming]] = {}
    for t in timings:
        by_layer.setdefault(t.layer, []).append(t)
    return [n for n, ts in by_layer.items() if all(t.speedup >= min_speedup for t in ts)]


def sparsify_model(model: nn.Module, layers: Iterable[str]) -> nn.Module:
    """Replace the named conv/linear modules of ``model`` (in place) by CSR modules; returns it."""
    for n in layers:
        _set_module(model, n, _csr_module(model.get_submodule(n)))
    return model


def load_sparse(folder: str | Path) -> nn.Module:
    """Rebuild a ``sparse`` export (eval mode, CPU, fp32) from ``sparse.json`` + ``model.safetensors``.

    Raises:
        FileNotFoundError: a file is missing.
        ExportError: ``sparse.json`` is not a sparse export, or the weights do not fit it.
    """
    from sparse_core.models import create_model

    folder = Path(folder)
    spec = artifacts.read_json(folder / "sparse.json")
    if spec.get("format") != SPARSE_FORMAT or spec.get("version") != FORMAT_VERSION:
        raise ExportError(f"{folder / 'sparse.json'}: expected format {SPARSE_FORMAT!r} version {FORMAT_VERSION}")
    c, h, _ = spec["input_shape"]
    model = create_model(spec["model"], in_channels=c, num_classes=spec["num_classes"], image_size=h, **spec["model_kwargs"])
    tensors = artifacts.load_tensors(folder / "model.safetensors")
    for n in spec["csr_layers"]:
        m = model.get_submodule(n)
        shape = tuple(spec["csr_shapes"][n])
        pre = f"{n}.lin." if isinstance(m, nn.Conv2d) else f"{n}."
        dense_w = torch.sparse_csr_tensor(tensors[pre + "crow_indices"], tensors[pre + "col_indices"], tensors[pre + "values"],
                                          (shape[0], math.prod(shape[1:]))).to_dense().view(shape)  # fmt: skip
        with torch.no_grad():
            m.weight.copy_(dense_w)
        _set_module(model, n, _csr_module(m))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{folder / 'model.safetensors'}: does not fit sparse.json: {str(exc).splitlines()[0]}") from None
    return model.eval()


# ===== exports of a run =======================================================================
def _check_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str) -> float:
    diff = float((a - b).abs().max())
    if not diff <= atol:
        raise ExportError(f"{what}: outputs differ from the masked model by {diff:.3g} (> {atol:g})")
    return diff


def _probe(input_shape: tuple[int, int, int], batch: int = 8) -> torch.Tensor:
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))


def export_compact(run: LoadedRun, out: str | Path) -> Path:
    """Compact export of a structured run (module docstring); checks outputs on random inputs.

    Raises:
        ExportError: the run is not filter-structured (its name, method and granularity are in
            the message), the model has no compact form, or the check fails (> ``COMPACT_ATOL``).
    """
    if not is_filter_structured(run.masks):
        why = "has no masks (a dense run)" if not run.masks else "has masks that are not whole filters"
        raise ExportError(
            f"run {run.name!r} (method {run.method}, pruning.granularity {run.granularity}) {why}; "
            "--format compact needs a structured pruning run (train.pruning.granularity: structured); "
            "use --format sparse or onnx"
        )
    compact, arch = compact_model(run.model, run.input_shape)
    x = _probe(run.input_shape)
    with torch.no_grad():
        diff = _check_close(compact(x), run.model(x), COMPACT_ATOL, f"compact export of run {run.name!r}")
    arch["source"] = _source(run, {"max_abs_diff_vs_masked": diff})
    return save_compact(compact, arch, out)


def _source(run: LoadedRun, extra: dict[str, Any]) -> dict[str, Any]:
    from sparse_core.flops import layer_flops

    return {"run": str(run.folder), "method": run.method, "granularity": run.granularity, "model": run.model_name,
            "model_kwargs": run.model_kwargs, "dense_flops": sum(layer_flops(run.model, run.input_shape).values()),
            **extra}  # fmt: skip


def export_sparse(
    run: LoadedRun, out: str | Path, layers: str | list[str] = "measure", batch_sizes: tuple[int, ...] = (1, 256),
    min_speedup: float = 1.1,
) -> Path:
    """Sparse (CSR where it is faster) export of a run.

    Args:
        layers: ``"measure"`` (time each masked layer, :func:`time_layers`, keep CSR where
            :func:`choose_csr_layers` says it wins), ``"all"``, ``"none"`` or a list of names.
        batch_sizes: batch sizes of the measurement; CSR must win at each.
        min_speedup: dense/CSR time ratio a layer must reach.

    Raises:
        ExportError: the run has no masks, a named layer is not a masked conv/linear layer, or
            the sparse model's outputs differ from the masked model's by more than 1e-5.
    """
    if not run.masks:
        raise ExportError(f"run {run.name!r} (method {run.method}) has no masks: nothing to store sparsely")
    candidates = [n.removesuffix(".weight") for n in run.masks]
    timings: list[LayerTiming] = []
    if layers == "measure":
        timings = time_layers(run.model, run.input_shape, candidates, batch_sizes)
        chosen = choose_csr_layers(timings, min_speedup)
    elif layers == "all":
        chosen = candidates
    elif layers == "none":
        chosen = []
    else:
        unknown = sorted(set(layers) - set(candidates))
        if unknown:
            raise ExportError(f"run {run.name!r}: layers {unknown} are not masked conv/linear layers ({candidates})")
        chosen = list(layers)
    import copy

    sparse = sparsify_model(copy.deepcopy(run.model), chosen).eval()
    x = _probe(run.input_shape)
    with torch.no_grad():
        diff = _check_close(sparse(x), run.model(x), COMPACT_ATOL, f"sparse export of run {run.name!r}")
    spec = {
        "format": SPARSE_FORMAT, "version": FORMAT_VERSION, "model": run.model_name, "model_kwargs": run.model_kwargs,
        "input_shape": list(run.input_shape), "num_classes": run.num_classes, "csr_layers": chosen,
        "csr_shapes": {n: list(run.model.get_submodule(n).weight.shape) for n in chosen},
        "decision": {"rule": layers if isinstance(layers, str) else "given", "min_speedup": min_speedup,
                     "batch_sizes": list(batch_sizes) if layers == "measure" else []},
        "timings": [{"layer": t.layer, "batch": t.batch, "density": t.density, "dense_s": t.dense_s,
                     "csr_s": t.csr_s, "speedup": t.speedup} for t in timings],
        "source": _source(run, {"max_abs_diff_vs_masked": diff}),
    }  # fmt: skip
    folder = Path(out)
    with artifacts.atomic_dir(folder, holds=("model.safetensors", "sparse.json"), owner="export (sparse)") as tmp:
        artifacts.save_tensors(sparse.state_dict(), tmp / "model.safetensors")
        artifacts.write_json(spec, tmp / "sparse.json")
    return folder


def onnx_runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(run: LoadedRun, out: str | Path) -> Path:
    """ONNX export: the compact network for filter-structured runs, else the masked network.

    Input name ``input`` ``(batch, C, H, W)`` with a dynamic batch axis, output ``logits``.
    The model is checked with onnxruntime against PyTorch on random inputs (batch 1 and 8)
    when onnxruntime is importable; ``onnx.json`` records the result or that it was skipped.

    Raises:
        ExportError: the ONNX model's outputs differ from PyTorch's by more than ``ONNX_ATOL``.
    """
    if is_filter_structured(run.masks):
        model, arch = compact_model(run.model, run.input_shape)
        which = "compact"
    else:
        model, arch, which = run.model, None, "masked"
    folder = Path(out)
    with artifacts.atomic_dir(folder, holds=("model.onnx", "onnx.json"), owner="export (onnx)") as tmp:
        path = tmp / "model.onnx"
        to_onnx(model, run.input_shape, path)
        check: dict[str, Any] = {"onnxruntime": "skipped: onnxruntime is not importable"}
        if onnx_runtime_available():
            diffs = []
            for batch in (1, 8):
                x = _probe(run.input_shape, batch)
                with torch.no_grad():
                    ref = model(x).numpy()
                got = run_onnx(path, x.numpy())
                diffs.append(float(abs(got - ref).max()))
            if max(diffs) > ONNX_ATOL:
                raise ExportError(f"onnx export of run {run.name!r}: onnxruntime differs from PyTorch by {max(diffs):.3g}")
            import onnxruntime

            check = {"onnxruntime": onnxruntime.__version__, "max_abs_diff_vs_pytorch": max(diffs)}
        meta = {"model": which, "input_shape": list(run.input_shape), "input": "input", "output": "logits",
                "check": check, "source": _source(run, {})}  # fmt: skip
        if arch is not None:
            meta["arch"] = arch
        artifacts.write_json(meta, tmp / "onnx.json")
    return folder


def to_onnx(model: nn.Module, input_shape: tuple[int, int, int], dest: str | Path) -> None:
    """``torch.onnx.export`` (dynamo exporter) of ``model`` with a dynamic batch axis."""
    x = torch.zeros(2, *input_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model.eval(), (x,), input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)  # fmt: skip
        prog.save(str(dest))


def run_onnx(path: str | Path, x) -> Any:
    """Logits of an exported ONNX model under onnxruntime (CPU); ``x`` a float32 numpy array."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def export_run(folder: str | Path, fmt: str, out: str | Path | None = None, **kwargs: Any) -> Path:
    """Export a run folder in ``fmt`` (``compact``, ``sparse``, ``onnx``) to ``out`` (default
    ``<folder>/export/<fmt>``); ``kwargs`` go to :func:`load_run` (``input_shape``,
    ``num_classes``) or the format's exporter.

    Raises:
        ExportError: unknown format, or the run cannot be exported in it.
        FileNotFoundError: the run folder or one of its files is missing.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    load_kw = {k: kwargs.pop(k) for k in ("input_shape", "num_classes") if k in kwargs}
    run = load_run(folder, **load_kw)
    out = Path(out) if out is not None else Path(folder) / "export" / fmt
    exporter: Callable[..., Path] = {"compact": export_compact, "sparse": export_sparse, "onnx": export_onnx}[fmt]
    return exporter(run, out, **kwargs)


def run_folder(runs_dir: str | Path, run: str) -> Path:
    """``<runs_dir>/<run>`` for the name of a run there (``dpf``, ``gmp_retrain``): ``run`` is
    matched against the run folders that exist (:func:`sparse_core.config.plain_name`), never
    joined as given.

    Raises:
        UnknownNameError: no run folder (one with a ``config.json``) of that name; the message
            lists the runs in ``runs_dir`` and says so when ``run`` looks like a path.
    """
    from sparse_core.config import plain_name

    runs = Path(runs_dir)
    known = [p.name for p in runs.iterdir() if (p / "config.json").is_file()] if runs.is_dir() else []
    return runs / plain_name(run, known, f"run (in {runs_dir})")


def export_named_run(params_path: str | Path, run: str, fmt: str, seed: int | None = None, out: str | Path | None = None) -> Path:
    """``sparseflow export``: export run ``run`` of training seed ``seed`` (default: the first of
    ``base.seeds``), found in ``<base.runs_dir>/s<seed>/<run>/`` of the params file, to ``out``
    (default ``<run folder>/export/<fmt>``).

    Raises:
        ConfigError: the params file is invalid.
        UnknownNameError, ExportError, FileNotFoundError: as :func:`run_folder` and :func:`export_run`.
    """
    from sparse_core.config import load_params, seeded

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    params = seeded(load_params(params_path), seed)
    return export_run(run_folder(params.base.runs_dir, run), fmt, out)
