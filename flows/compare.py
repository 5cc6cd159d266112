"""``sparseflow compare [REV_A] [REV_B]``: metric and params differences between two revisions, as markdown.

Built on DVC's own Python API (``Repo.metrics.diff`` and ``Repo.params.diff``), so it mirrors
``dvc metrics diff [a_rev] [b_rev]`` / ``dvc params diff``: ``REV_A`` defaults to ``HEAD`` and ``REV_B`` to the
workspace. A revision is anything DVC resolves: a commit, branch, tag, ``HEAD~1``, or the name (or
``refs/exps/...`` ref) of an experiment made by ``dvc exp run``.

    sparseflow compare                    # HEAD vs workspace
    sparseflow compare HEAD~1 HEAD        # two commits
    sparseflow compare HEAD exp1          # HEAD vs the experiment `exp1`
    sparseflow compare main HEAD --all --precision 3
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

WORKSPACE = "workspace"  # DVC's name for the working tree in metrics/params diffs
MISSING = "—"


def compare(
    rev_a: str | None = "HEAD",
    rev_b: str | None = None,
    root: str | Path = ".",
    all_rows: bool = False,
    precision: int = 4,
) -> str:
    """Compare metrics and params of two revisions with DVC's diff API.

    Args:
        rev_a: The old revision (commit, branch, tag, experiment name); ``None`` means the workspace.
        rev_b: The new revision; ``None`` (the default) means the workspace, like ``dvc metrics diff``.
        root: A folder inside the DVC repository (DVC looks upwards for its root, like the ``dvc`` command).
        all_rows: Show unchanged metrics and params too.
        precision: Decimal places that numbers are rounded to.

    Returns:
        Markdown: a metrics table (``| file | metric | REV_A | REV_B | change |``) and a params table
        (``| file | param | REV_A | REV_B |``), or a line per table saying that nothing differs. Files DVC could
        not load at a revision are listed in a note under the table.

    Raises:
        ValueError: ``root`` is not (inside) a DVC repository, the repository is not a git repository or has no
            commits, or a revision is unknown (the message names it).
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import NoSCMError, RevError

    a = rev_a or WORKSPACE
    b = rev_b or WORKSPACE
    folder = Path(root)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    try:
        repo = Repo(str(folder))
    except NotDvcRepoError as exc:
        raise ValueError(f"{str(folder)!r} is not a DVC repository: {exc}") from exc

    with repo:
        try:
            if repo.scm.no_commits:
                rev = next((r for r in (a, b) if r != WORKSPACE), a)
                raise ValueError(f"unknown revision {rev!r}: the git repository {repo.scm.root_dir!r} has no commits")
        except NoSCMError as exc:
            raise ValueError(f"{repo.root_dir!r} is not a git repository, so it has no revisions to compare") from exc
        diff_a, diff_b = _dvc_revs(repo, a, b)
        labels = {diff_b: b, diff_a: a}
        try:
            metrics = repo.metrics.diff(a_rev=diff_a, b_rev=diff_b, all=all_rows)
            params = repo.params.diff(a_rev=diff_a, b_rev=diff_b, all=all_rows)
        except RevError as exc:  # resolved above; kept for revisions that vanish in between
            raise ValueError(f"unknown revision: {exc}") from exc
        errors = _errors(metrics, "metrics", labels) + _errors(params, "params", labels)

    parts = [
        _metrics_table(metrics.get("diff", {}), a, b, precision),
        _params_table(params.get("diff", {}), a, b, precision),
    ]
    if errors:
        parts.append("\n".join(f"> {line}  " for line in errors).rstrip())
    return "\n\n".join(parts) + "\n"


def _dvc_revs(repo: Any, a: str, b: str) -> tuple[str, str]:
    """Check that both revisions resolve and return the names to hand to DVC's diff.

    DVC keys its per-revision results by the names of a commit joined with commas, so two different names of one
    commit (``HEAD`` and ``main``) would each find nothing; when both resolve to the same commit, ask for one.
    """
    from dvc.scm import RevError, resolve_rev

    shas = {}
    for rev in dict.fromkeys((a, b)):
        if rev == WORKSPACE:
            continue
        try:
            shas[rev] = resolve_rev(repo.scm, rev)
        except RevError as exc:
            raise ValueError(f"unknown revision {rev!r}: {exc}") from exc
    if a != b and a in shas and shas.get(a) == shas.get(b):
        return a, a
    return a, b


def _errors(result: dict[str, Any], kind: str, labels: dict[str, str]) -> list[str]:
    """Lines describing what DVC failed to load, per revision and file."""
    lines = []
    for rev, err in sorted(result.get("errors", {}).items()):
        label = labels.get(rev, rev)
        if isinstance(err, dict):
            for path, exc in sorted(err.items()):
                lines.append(f"DVC could not load {kind} file `{path}` at {label}: {exc}")
        elif err:
            lines.append(f"DVC could not load {kind} at {label}: {err}")
    return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any, precision: int) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float) and math.isfinite(value):
        value = round(value, precision) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text or '""'


def _change(old: Any, new: Any, precision: int) -> str:
    if not (_is_number(old) and _is_number(new)):
        return MISSING
    delta = new - old
    if isinstance(delta, float):
        if not math.isfinite(delta):
            return str(delta)
        delta = round(delta, precision)
    return "0" if delta == 0 else f"{delta:+}"


def _rows(diff: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str, Any, Any]]:
    return sorted(
        (path, name, entry.get("old"), entry.get("new"))
        for path, entries in diff.items()
        for name, entry in entries.items()
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metrics_table(diff: dict[str, Any], a: str, b: str, precision: int) -> str:
    rows = _rows(diff)
    if not rows:
        return f"No metric differences between {a} and {b}."
    body = [[p, n, _fmt(o, precision), _fmt(v, precision), _change(o, v, precision)] for p, n, o, v in rows]
    return f"### Metrics: {a} → {b}\n\n" + _table(["file", "metric", a, b, "change"], body)


def _params_table(diff: dict[str, Any], a: str, b: str, precision: int) -> str:
    rows = _rows(diff)
    if not rows:
        return f"No params differences between {a} and {b}."
    body = [[p, n, _fmt(o, precision), _fmt(v, precision)] for p, n, o, v in rows]
    return f"### Params: {a} → {b}\n\n" + _table(["file", "param", a, b], body)


def add_parser(subparsers: Any) -> None:
    """Register the ``compare`` subcommand.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.
    """
    p = subparsers.add_parser(
        "compare",
        help="markdown table of metric and params differences between two commits or experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("rev_a", nargs="?", default="HEAD", help="old revision or experiment name (default: HEAD)")
    p.add_argument("rev_b", nargs="?", default=None, help="new revision or experiment name (default: the workspace)")
    p.add_argument("--all", action="store_true", help="show unchanged metrics and params too")
    p.add_argument("--precision", type=int, default=4, help="decimal places numbers are rounded to (default: 4)")
    p.add_argument("--root", default=".", help="a folder inside the DVC repository (default: .)")


def run(args: argparse.Namespace) -> int:
    """Print the comparison for parsed ``compare`` arguments.

    Args:
        args: Namespace with ``rev_a``, ``rev_b``, ``all``, ``precision`` and ``root``.

    Returns:
        0. Errors propagate as :class:`ValueError` (unknown revision, not a DVC repository).
    """
    print(compare(args.rev_a, args.rev_b, root=args.root, all_rows=args.all, precision=args.precision), end="")
    return 0
