"""Which rows of a split a study uses, and what their labels mean.

* :class:`Holdout` - a seeded, stratified division of one split into two disjoint parts, so that one
  image folder gives both the fine-tuning set (``take: rest``) and a benchmark (``take: held_out``);
* :func:`sample_rows` - ``max_images`` as a seeded sample stratified by label, not the first rows;
* :func:`class_index` - label values (ints, strings, a ``ClassLabel``) as class indices ``0..C-1`` and
  the class names in that order, for class maps with gaps or starting at 1.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .sources import DataError


class Holdout(BaseModel):
    """``{share: 0.3, take: held_out}`` on a benchmark and ``{share: 0.3, take: rest}`` on the fine-tuning
    set divide the same split into disjoint parts: each class (column ``by``; no stratification when the
    split lacks it) puts ``round(share * n)`` of its rows, chosen with the data seed, into the held-out part."""

    model_config = ConfigDict(extra="forbid")
    share: float = Field(gt=0, lt=1, description="share of the split held out")
    take: Literal["rest", "held_out"] = Field(description="which part this data uses")
    by: str = Field("label", description="column to stratify by (ignored when the split has no such column)")


def stratified_split(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(first, rest)`` of a seeded split of ``labels`` ``[N]``, stratified: each class puts
    ``round(share * n_class)`` of its items (at least 1 when it has 2 or more) into ``first``. Disjoint,
    covering, and the same for the same labels and seed."""
    gen = torch.Generator().manual_seed(seed)
    first, rest = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(len(idx) - 1, max(1, round(share * len(idx)))) if len(idx) > 1 else 0
        first.append(idx[:k])
        rest.append(idx[k:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(rest)).values


def _strata(ds, column: Optional[str]) -> torch.Tensor:
    if not column or column not in ds.column_names:
        return torch.zeros(len(ds), dtype=torch.long)
    _, inverse = np.unique(np.asarray([str(v) for v in ds[column]]), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64))


def apply_holdout(ds, holdout: Optional[Holdout], seed: int):
    """The part of ``ds`` that ``holdout`` takes (all of ``ds`` when None)."""
    if holdout is None:
        return ds
    held, rest = stratified_split(_strata(ds, holdout.by), holdout.share, seed)
    return ds.select((held if holdout.take == "held_out" else rest).tolist())


def sample_rows(ds, n: Optional[int], seed: int, label_column: Optional[str] = None):
    """``max_images``: about ``n`` rows of ``ds`` drawn with ``seed``, stratified by ``label_column`` (each
    class keeps its share), in their original order; all of ``ds`` when it has ``n`` rows or fewer."""
    if not n or len(ds) <= n:
        return ds
    strata = _strata(ds, label_column)
    if len(torch.unique(strata)) == 1:
        keep = torch.sort(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]).values
    else:
        keep = stratified_split(strata, n / len(ds), seed)[0]
    return ds.select(keep.tolist())


def class_index(values: Sequence, classnames: Union[None, list, dict], feature_names: Optional[list[str]],
                where_label: str, where_names: str) -> tuple[list[str], np.ndarray]:
    """``(class names, labels [N] in 0..C-1)`` for the label ``values`` of a split.

    ``classnames`` may be a list (label ``i`` is ``classnames[i]``; string labels are looked up by name),
    a ``{label: name}`` map (its labels, sorted, become ``0..C-1``: gaps and a start at 1 add no phantom
    class), or None (the column's ``ClassLabel`` names ``feature_names``, else the sorted distinct string
    labels). Raises :class:`DataError` naming ``where_label`` or ``where_names`` for a label with no name.
    """
    values = list(values)
    if any(v is None for v in values):
        raise DataError(f"{where_label}: {sum(v is None for v in values)} rows have no label")
    strings = any(isinstance(v, str) for v in values)
    if isinstance(classnames, dict):
        ordered = sorted(classnames)
        names, position = [classnames[k] for k in ordered], {k: i for i, k in enumerate(ordered)}
        lookup = {**position, **{str(k): i for k, i in position.items()}, **{n: i for i, n in enumerate(names)}}
    else:
        names = list(classnames) if classnames is not None else list(feature_names or [])
        if not names and strings:
            names = sorted({str(v) for v in values})
        if not names:
            raise DataError(f"{where_names}: label column has no class names; list them (classnames)")
        lookup = {**{i: i for i in range(len(names))}, **{n: i for i, n in enumerate(names)}}
        if strings:
            lookup.update({str(i): i for i in range(len(names))})
    labels, missing = [], []
    for v in values:
        k = v if isinstance(v, str) else int(v)
        if k not in lookup:
            missing.append(v)
        labels.append(lookup.get(k, -1))
    if missing:
        at = where_label if strings and not isinstance(classnames, dict) else where_names
        raise DataError(f"{at}: labels {sorted(set(map(str, missing)))[:5]} have no class name "
                        f"(class names: {names[:8]}{'...' if len(names) > 8 else ''})")
    empty = [i for i, n in enumerate(names) if not str(n).strip()]
    if empty:
        raise DataError(f"{where_names}: class {empty[0]} has an empty name")
    return names, np.asarray(labels, dtype=np.int64)
