"""Binary masks over a model's prunable set.

The prunable set is every ``nn.Conv2d`` and ``nn.Linear`` weight, in module order; biases and
normalisation layers are never pruned. ``keep_first_dense`` / ``keep_last_dense`` remove the
first convolution / last linear layer from the set (they stay dense and do not count towards
the sparsity target). Sparsity ``S`` and density ``D = 1 - S`` are fractions (0-1) of the
prunable set.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import torch
from torch import nn

from sparse_core.artifacts import ArtifactError, load_tensor_metadata, load_tensors, save_tensors, write_parquet

LAYER_TABLE_SCHEMA = pa.DataFrameSchema(
    {
        "name": pa.Column(str, unique=True),
        "shape": pa.Column(str),
        "numel": pa.Column("int64", pa.Check.gt(0)),
        "target_density": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "density": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "nonzeros": pa.Column("int64", pa.Check.ge(0)),
    },
    checks=pa.Check(lambda df: (df["nonzeros"] <= df["numel"]).all(), error="nonzeros exceed numel"),
    strict=True,
)


def prunable_parameters(
    model: nn.Module, keep_first_dense: bool = False, keep_last_dense: bool = False
) -> dict[str, nn.Parameter]:
    """Ordered ``{"<module>.weight": parameter}`` of the conv and linear layers to prune."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if keep_first_dense and layers and isinstance(layers[0][1], nn.Conv2d):
        layers = layers[1:]
    if keep_last_dense and layers and isinstance(layers[-1][1], nn.Linear):
        layers = layers[:-1]
    return {f"{n}.weight": m.weight for n, m in layers}


class MaskSet:
    """One boolean mask per prunable weight, same shape, on the weight's device.

    Args:
        params: ``{name: parameter}`` (from :func:`prunable_parameters`).

    Attributes:
        masks: ``{name: bool tensor}``, True = active (kept) weight.
        target_density: ``{name: float}`` the last density each layer was asked for.
    """

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = dict(params)
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.target_density = {n: 1.0 for n in self.params}

    # ----- applying -------------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the inactive weights in place: ``w <- m ⊙ w``."""
        for n, p in self.params.items():
            p.mul_(self.masks[n])

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradient of inactive weights in place."""
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    def masked_weights(self) -> dict[str, torch.Tensor]:
        """``{name: m ⊙ w}`` (new tensors; the parameters are untouched)."""
        return {n: p.detach() * self.masks[n] for n, p in self.params.items()}

    # ----- statistics -----------------------------------------------------------------------
    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def active(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def density(self) -> float:
        return self.active() / max(self.numel(), 1)

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def layer_table(self) -> pd.DataFrame:
        """One row per prunable layer; validated by :data:`LAYER_TABLE_SCHEMA`.

        ``nonzeros`` counts the nonzero entries of ``m ⊙ w`` (<= active weights: an active
        weight may be exactly 0, e.g. just regrown).
        """
        rows = []
        for n, p in self.params.items():
            m = self.masks[n]
            rows.append(
                {
                    "name": n,
                    "shape": "x".join(map(str, p.shape)),
                    "numel": p.numel(),
                    "target_density": float(self.target_density[n]),
                    "density": float(m.sum()) / m.numel(),
                    "nonzeros": int(torch.count_nonzero(p.detach() * m)),
                }
            )
        df = pd.DataFrame(rows).astype({"numel": "int64", "nonzeros": "int64"})
        return LAYER_TABLE_SCHEMA.validate(df)

    # ----- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: bool tensor (CPU)}`` plus ``{name + ":target": float64 scalar}``."""
        sd: dict[str, torch.Tensor] = {n: m.detach().cpu().clone() for n, m in self.masks.items()}
        sd.update({f"{n}:target": torch.tensor(d, dtype=torch.float64) for n, d in self.target_density.items()})
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load masks saved by :meth:`state_dict`.

        Raises:
            KeyError: a prunable weight has no mask in ``sd`` or ``sd`` has an unknown name.
            ValueError: a mask's shape differs from its weight's.
        """
        names = {k for k in sd if not k.endswith(":target")}
        if names != set(self.params):
            raise KeyError(
                f"mask names differ from the model's prunable set: missing {sorted(set(self.params) - names)}, "
                f"unexpected {sorted(names - set(self.params))}"
            )
        for n, p in self.params.items():
            m = sd[n]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"mask {n!r} has shape {tuple(m.shape)}, weight has {tuple(p.shape)}")
            self.masks[n] = m.to(device=p.device, dtype=torch.bool).clone()
            if f"{n}:target" in sd:
                self.target_density[n] = float(sd[f"{n}:target"])

    def save(self, path: str | Path) -> None:
        """Write ``masks.safetensors`` (uint8 masks; metadata holds the target densities)."""
        tensors = {n: m.to(torch.uint8) for n, m in self.masks.items()}
        save_tensors(tensors, path, metadata={n: repr(d) for n, d in self.target_density.items()})

    def load(self, path: str | Path) -> None:
        """Load ``masks.safetensors`` written by :meth:`save` (safetensors: no code is run).

        Raises:
            FileNotFoundError: no file at ``path``.
            ArtifactError: the file is not valid safetensors (truncated, another format), or its
                masks do not fit this model (names, shapes, non-binary values, bad target
                densities); the message names the file.
        """
        tensors = load_tensors(path)
        meta = load_tensor_metadata(path)
        try:
            sd = dict(tensors)
            for n, t in tensors.items():
                binary = t.dtype in (torch.bool, torch.uint8) and (t.numel() == 0 or int(t.max()) <= 1)
                if not binary:
                    raise ValueError(f"mask {n!r} is not binary 0/1 (dtype {t.dtype})")
            targets = {n: float(v) for n, v in meta.items()}
            bad = {n: d for n, d in targets.items() if not 0.0 <= d <= 1.0}
            if bad:
                raise ValueError(f"target densities outside [0, 1]: {bad}")
            sd.update({f"{n}:target": torch.tensor(d, dtype=torch.float64) for n, d in targets.items()})
            self.load_state_dict(sd)
        except (KeyError, ValueError, TypeError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ArtifactError(f"{path}: masks do not fit this model: {reason}") from None

    def write_layer_table(self, path: str | Path) -> None:
        write_parquet(self.layer_table(), path)
