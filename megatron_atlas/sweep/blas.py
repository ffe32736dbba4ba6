"""Run a block with one OpenBLAS thread.

The fit solves thousands of 5-parameter problems; in them BLAS threads only add wake-up overhead
(L-BFGS-B ran 15x slower with 2 threads than with 1 on a busy 2-core machine). This sets the thread
count of every OpenBLAS the process has loaded (found in /proc/self/maps: numpy's and scipy's wheels
each bundle one, under prefixed symbol names) to 1 and restores it afterwards; with other BLAS builds
or off Linux it does nothing.
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# (setter, getter) names: plain OpenBLAS, scipy-openblas (scipy), scipy-openblas 64-bit ints (numpy)
_SYMBOLS = (("openblas_set_num_threads", "openblas_get_num_threads"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"))


def _controls() -> list[tuple]:
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    paths = sorted({line.split()[-1] for line in maps.read_text().splitlines()
                    if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                controls.append((setter, getter))
                break
    return controls


@contextmanager
def one_blas_thread() -> Iterator[None]:
    controls = _controls()
    previous = [getter() for _, getter in controls]
    for setter, _ in controls:
        setter(1)
    try:
        yield
    finally:
        for (setter, _), count in zip(controls, previous):
            setter(max(1, count))
