"""
`copy_into(out, array)`: `out[...] = array` for the permuted views that the key table makes, as fast as this process
allows.

Nearly every byte of a checkpoint goes through a transpose (Flax keeps Dense kernels as (in, out), nn.Linear as
(out, in)), and the transposes are the largest cost of a conversion after the sha256. For a 2-D transpose this uses
OpenBLAS's `cblas_somatcopy`, from the OpenBLAS that NumPy's wheels ship: 4-8 GB/s on one core for ViT-B/16's kernels,
about 2x torch's blocked copy (which is itself 2.5x NumPy's; MKL's `mkl_somatcopy` inside torch runs at 1.5 GB/s on AMD
CPUs). Any other permutation, or a NumPy without that library (a conda or macOS Accelerate build), takes torch's copy:
the same values, only slower. The binding is checked on a small matrix before it is trusted.
"""

import ctypes
import functools
import warnings
from pathlib import Path

import numpy as np


ROW_MAJOR, TRANSPOSE = 101, 112  # CBLAS_ORDER.CblasRowMajor, CBLAS_TRANSPOSE.CblasTrans


@functools.cache
def _somatcopy():
    """OpenBLAS's `cblas_somatcopy` from NumPy's bundled library, or None. Called once."""
    numpy_dir = Path(np.__file__).parent
    # manylinux and Windows wheels keep it in numpy.libs/ beside the package, macOS wheels in numpy/.dylibs/
    for library in sorted([*numpy_dir.parent.glob("numpy.libs/*openblas*"), *numpy_dir.glob(".dylibs/*openblas*")]):
        try:
            handle = ctypes.CDLL(str(library))
        except OSError:
            continue
        # scipy-openblas64 (NumPy 2: 64-bit integers) or scipy-openblas32
        for symbol, integer in (("scipy_cblas_somatcopy64_", ctypes.c_int64), ("scipy_cblas_somatcopy", ctypes.c_int)):
            function = getattr(handle, symbol, None)
            if function is None:
                continue
            function.restype = None
            function.argtypes = [ctypes.c_int, ctypes.c_int, integer, integer, ctypes.c_float]
            function.argtypes += [ctypes.c_void_p, integer, ctypes.c_void_p, integer]
            if _works(function):
                return function
    return None


def _works(function) -> bool:
    source = np.arange(15, dtype=np.float32).reshape(3, 5)
    out = np.zeros((5, 3), dtype=np.float32)
    function(ROW_MAJOR, TRANSPOSE, 3, 5, 1.0, source.ctypes.data, 5, out.ctypes.data, 3)
    return bool(np.array_equal(out, source.T))


def copy_into(out: np.ndarray, array: np.ndarray) -> np.ndarray:
    """Copy the float32 `array` (any strides) into the C-contiguous float32 `out` of the same shape; returns `out`."""
    if out.shape != array.shape or out.dtype != np.float32 or array.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"cannot copy a {array.dtype} {array.shape} array into a {out.dtype} {out.shape} one")
    somatcopy = _somatcopy() if array.ndim == 2 and array.T.flags.c_contiguous and array.size else None
    if somatcopy is not None:
        rows, columns = array.T.shape  # `array` is the transpose of this C-contiguous matrix
        somatcopy(ROW_MAJOR, TRANSPOSE, rows, columns, 1.0, array.ctypes.data, columns, out.ctypes.data, rows)
        return out
    import torch

    with warnings.catch_warnings():  # the source may be read-only (a mapped file); it is only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.from_numpy(out).copy_(torch.from_numpy(array))
    return out


__all__ = ["copy_into"]
