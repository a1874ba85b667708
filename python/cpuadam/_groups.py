# SPDX-License-Identifier: MIT
"""Normalising params, param groups and defaults, shared by the optimizer classes."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

_SUPPORTED = "float32, float16 or bfloat16 (ml_dtypes)"


def _dtype_supported(dtype: np.dtype) -> bool:
    return dtype in (np.float32, np.float16) or (dtype.kind == "V" and dtype.name == "bfloat16")


def numpy_dtype(name: str | None, like: np.dtype) -> np.dtype:
    """The NumPy dtype of a state buffer: name None keeps like's dtype."""
    if name is None:
        return like
    if name == "bfloat16":
        import ml_dtypes  # only needed once bfloat16 buffers are asked for
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def param_name(group: int, index: int) -> str:
    return f"params[{index}] in group {group}"


def check_param_array(p: Any, name: str) -> None:
    """Raises TypeError/ValueError unless p can be updated in place by the core."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(p).__name__}")
    if not _dtype_supported(p.dtype):
        raise TypeError(f"{name}: expected a {_SUPPORTED} array, got {p.dtype}")
    if not p.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    if not p.flags.aligned:
        raise ValueError(f"{name}: data is not aligned to its element size")
    if not p.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array, got a read-only one")


def normalise_groups(params: Any) -> list[dict]:
    """params as torch accepts it: an iterable of arrays, or of dicts with 'params'."""
    if isinstance(params, (np.ndarray, dict)):
        raise TypeError("params argument given to the optimizer should be an iterable of "
                        f"arrays or dicts, but got {type(params).__name__}")
    try:
        items = list(params)
    except TypeError:
        raise TypeError("params argument given to the optimizer should be an iterable of "
                        f"arrays or dicts, but got {type(params).__name__}") from None
    if len(items) == 0:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        return [dict(g) for g in items]
    if any(isinstance(x, dict) for x in items):
        raise TypeError("params must be all arrays or all dicts, not a mix")
    return [{"params": items}]


def split_names(group: dict) -> None:
    """Normalises group['params'] to a list of arrays, moving names given as
    (name, array) pairs (torch's named_parameters() style) to group['param_names']."""
    ps = group["params"]
    if isinstance(ps, np.ndarray):
        ps = [ps]
    elif isinstance(ps, (set, frozenset)):
        raise TypeError("optimizer parameters need to be organized in ordered collections, "
                        "but the ordering of sets is not deterministic; use a list instead")
    ps = list(ps)
    named = [isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in ps]
    if any(named):
        if not all(named):
            raise ValueError("params must be all (name, array) pairs or all arrays, not a mix")
        group["param_names"] = [name for name, _ in ps]
        ps = [p for _, p in ps]
    group["params"] = ps


def check_disjoint(arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """No two params may share memory: a step writes them all."""
    extents = []
    for name, a in arrays:
        if a.nbytes == 0:
            continue
        lo = a.__array_interface__["data"][0]
        extents.append((lo, lo + a.nbytes, name))
    extents.sort(key=lambda e: e[0])
    for (lo0, hi0, n0), (lo1, hi1, n1) in zip(extents, extents[1:]):
        if lo1 < hi0:
            raise ValueError(f"{n1} shares memory with {n0}; each param must be its own buffer "
                             "(the same array twice, or overlapping views, cannot be optimized)")


def buffer_like(p: np.ndarray, fill: np.ndarray | float = 0.0, dtype: str | None = None) -> np.ndarray:
    """A new C-contiguous array of p's shape (and dtype, or the named one) whose
    address agrees with p's modulo 64 in elements, filled with ``fill`` (a value
    or an array to copy).

    The core aligns each run of a tensor to a 64-byte line of the param; state
    buffers that share the param's offset within a line are then aligned too,
    and no vector load or store straddles two cache lines.
    """
    dt = numpy_dtype(dtype, p.dtype)
    nbytes = p.size * dt.itemsize
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    # The same element offset within a line: a float32 buffer of a bfloat16 param sits at
    # twice the param's byte offset, so a run aligned for one is aligned for both.
    want = (p.__array_interface__["data"][0] % 64) // p.itemsize * dt.itemsize % 64
    start = (want - raw.__array_interface__["data"][0]) % 64
    out = raw[start:start + nbytes].view(dt).reshape(p.shape)
    out[...] = fill
    return out
