"""The input-file guard: the fields of a file the program reads (statistics, run metrics) are
checked where the file is parsed — type, finiteness, range — and a bad one is one line naming
the file, the field and the allowed range. Plans are checked by ``AdaptationPlan.from_dict``
(fields) and ``AdaptationPlan.validate`` (ranges against the model they meet)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


def bad(path: Any, field: str, value: Any, allowed: str, fix: str) -> ValueError:
    """``ValueError("<file> 'p': field 'f' is <v>; allowed: <range>; <fix>")``."""
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ValueError(f"{path}: field {field!r} is {shown}; allowed: {allowed}; {fix}")


def integer(value: Any, lo: int | None = None) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and (lo is None or value >= lo)
    )


def real(value: Any, lo: float | None = None, allow_inf: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    x = float(value)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        return False
    return lo is None or x >= lo


#: statistics fields that may be None, and the lower bound of each (None: any finite number)
# (proxy entropies are differential entropies: any finite number, negative included)
_OPTIONAL = {"entropy": None, "erank": 0.0, "sensitivity": 0.0, "noise_mean": None,
             "noise_std": 0.0, "snr": 0.0, "signal_std": 0.0, "signal_entropy": None,
             "signal_erank": 0.0}  # fmt: skip


def check_stats_module(d: Mapping[str, Any], where: str, fix: str) -> None:
    """ValueError naming the field of one module's statistics that has the wrong type or an
    impossible value (``where`` names the file and module)."""
    for key in ("name", "module_type"):
        if not isinstance(d.get(key), str):
            raise bad(where, key, d.get(key), "a string", fix)
    if not integer(d.get("layer"), 0):
        raise bad(where, "layer", d.get("layer"), "an integer ≥ 0", fix)
    shape = d.get("shape")
    if not (
        isinstance(shape, (list, tuple)) and len(shape) == 2 and all(integer(s, 1) for s in shape)
    ):
        raise bad(where, "shape", shape, "two integers ≥ 1 [d_out, d_in]", fix)
    if d.get("numel") != shape[0] * shape[1]:
        raise bad(where, "numel", d.get("numel"), f"shape's product {shape[0] * shape[1]}", fix)
    if not real(d.get("mean")):
        raise bad(where, "mean", d.get("mean"), "a finite number", fix)
    if not real(d.get("std"), 0.0):
        raise bad(where, "std", d.get("std"), "a finite number ≥ 0", fix)
    top = min(shape)
    for key, lo in _OPTIONAL.items():
        v = d.get(key)
        if v is None:
            continue
        if not real(v, lo, allow_inf=key == "snr"):  # snr is inf when the noise is 0
            want = "a finite number" if lo is None else f"a number ≥ {lo:g}"
            raise bad(where, key, v, f"null or {want}", fix)
        if key in ("erank", "signal_erank") and v > top * (1 + 1e-6):
            raise bad(where, key, v, f"null or 0..min(d_out, d_in) = {top}", fix)
