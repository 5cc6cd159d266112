"""pandera schemas of the tables that stages write and read back (Parquet and the plotted CSVs).

Every reader of an artifact table passes its schema to :func:`sparse_core.artifacts.read_parquet`
or :func:`sparse_core.artifacts.read_csv`, so a file that parses but holds the wrong thing
(a ``step`` column of strings, a missing ``val_accuracy``, an empty CSV) is refused with an
:class:`~sparse_core.artifacts.ArtifactError` naming the file and the column, instead of
flowing on into a metric or a figure. Schemas of tables with their own module stay there and are
re-exported here: :data:`LAYER_TABLE_SCHEMA` (``layers.parquet``, :mod:`sparse_core.sparsity.masks`),
:func:`probs_schema` (``probs.parquet``, :mod:`sparse_core.ensemble`), ``METRICS_SCHEMA``
(``reports/metrics.parquet``, :mod:`sparse_core.report`), ``prepared_schema``
(:mod:`sparse_core.data.prepare`).

Tables whose columns depend on the method (``mask_updates.parquet``: each method logs its own
event fields, DST one ``moved_fraction/<layer>`` column per layer) are checked on the columns
every writer shares and on the type of every column a writer in this package produces; unknown
extra columns are allowed (``strict=False``), so a new method may log new fields.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa

from sparse_core.ensemble import probs_schema  # noqa: F401  (re-exported)
from sparse_core.sparsity.masks import LAYER_TABLE_SCHEMA  # noqa: F401  (re-exported)

_FRACTION = pa.Check.in_range(0.0, 1.0)


def _opt(dtype: object, *checks: pa.Check, nullable: bool = True) -> pa.Column:
    """A column that a table may lack (its type is checked where it is present)."""
    return pa.Column(dtype, list(checks), required=False, nullable=nullable)


#: ``runs/<run>/history.parquet`` and ``plots/history/<run>.csv``: one row per epoch
#: (:func:`sparse_core.engine.fit`). Ensembles' CSVs add a ``member`` column.
HISTORY_SCHEMA = pa.DataFrameSchema(
    {
        "epoch": pa.Column("int64", pa.Check.ge(0)),
        "step": pa.Column("int64", pa.Check.ge(0)),
        "lr": _opt(float, pa.Check.ge(0.0)),
        "train_loss": _opt(float),
        "train_accuracy": _opt(float, _FRACTION),
        "val_loss": _opt(float),
        "val_accuracy": pa.Column(float, _FRACTION, nullable=True),
        "sparsity": _opt(float, _FRACTION),
        "seconds": _opt(float, pa.Check.ge(0.0)),
        "images_per_s": _opt(float, pa.Check.ge(0.0)),
        "member": _opt("int64", pa.Check.ge(0), nullable=False),
    },
    strict=False,
    coerce=False,
)

#: Columns and dtypes of a history table (what :func:`sparse_core.engine.fit` writes per epoch).
HISTORY_COLUMNS = {"epoch": "int64", "step": "int64", "lr": "float64", "train_loss": "float64",
                   "train_accuracy": "float64", "val_loss": "float64", "val_accuracy": "float64",
                   "sparsity": "float64", "seconds": "float64", "images_per_s": "float64"}  # fmt: skip


def empty_history() -> pd.DataFrame:
    """A history of zero epochs (a stage with ``epochs: 0``): no rows, but every column with its
    dtype, so its Parquet and CSV files are valid tables that readers accept."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in HISTORY_COLUMNS.items()})


#: ``runs/<run>/mask_updates.parquet``: one row per mask update (pruning step, drop/grow,
#: global exploration), in training-step order.
MASK_UPDATES_SCHEMA = pa.DataFrameSchema(
    {
        "step": pa.Column("int64", pa.Check.ge(0)),
        "kind": _opt(str),
        "sparsity": pa.Column(float, _FRACTION),
        "target_sparsity": _opt(float, _FRACTION),
        "flip_fraction": _opt(float, _FRACTION),
        "pruning_error": _opt(float, pa.Check.ge(0.0)),
        "drop_fraction": _opt(float, _FRACTION),
        # An integer count, but a float column with NaN where a method logs it for some events only
        # (GraNet: its pruning steps regrow nothing): any numeric dtype.
        "regrown": _opt(None, pa.Check.ge(0)),
        "exploration_rate": _opt(float, _FRACTION),
        "moved_fraction": _opt(float, _FRACTION),
        r"moved_fraction/.+": pa.Column(float, _FRACTION, regex=True, required=False, nullable=True),
        "backward_density": _opt(float, _FRACTION),
    },
    checks=pa.Check(lambda df: bool(df["step"].is_monotonic_increasing), error="step must not decrease"),
    strict=False,
)

#: ``plots/layers/<run>.csv``: the layer table as a CSV (same columns as ``layers.parquet``).
LAYERS_CSV_SCHEMA = pa.DataFrameSchema(
    {
        "name": pa.Column(str, unique=True),
        "numel": pa.Column("int64", pa.Check.gt(0)),
        "density": pa.Column(float, _FRACTION),
    },
    strict=False,
)

#: ``plots/corruption/<model>.csv``: accuracy per corruption and severity.
CORRUPTION_CSV_SCHEMA = pa.DataFrameSchema(
    {
        "corruption": pa.Column(str),
        "severity": pa.Column("int64", pa.Check.in_range(1, 5)),
        "accuracy": pa.Column(float, _FRACTION),
    },
    strict=False,
)

#: ``plots/reliability/<model>.csv``: the reliability diagram's bins (empty bins hold NaN).
RELIABILITY_CSV_SCHEMA = pa.DataFrameSchema(
    {
        "lower": pa.Column(float, _FRACTION),
        "upper": pa.Column(float, _FRACTION),
        "count": pa.Column("int64", pa.Check.ge(0)),
        "confidence": pa.Column(float, _FRACTION, nullable=True),
        "accuracy": pa.Column(float, _FRACTION, nullable=True),
    },
    strict=False,
)

#: ``reports/curves/points/<method>-s<seed>.csv``: one row per sparsity of a curves stage.
CURVE_POINTS_SCHEMA = pa.DataFrameSchema(
    {
        "method": pa.Column(str),
        "sparsity": pa.Column(float, _FRACTION),
        "seed": pa.Column("int64", pa.Check.ge(0)),
        "realised_sparsity": pa.Column(float, _FRACTION),
        "test_accuracy": pa.Column(float, _FRACTION),
        "test_nll": pa.Column(float, pa.Check.ge(0.0)),
        "pruned_test_accuracy": _opt(float, _FRACTION),
        "pruned_test_nll": _opt(float, pa.Check.ge(0.0)),
    },
    strict=False,
)
