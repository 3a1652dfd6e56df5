"""CUDA kernels as .cu/.cuh sources, their CuPy launchers, and the NumPy mirror of each kernel.

The mirrors follow the kernels' arithmetic (float32 accumulation, the same split and combine
order) so CPU CI exercises the bookkeeping (block tables, splits, masks) that the GPU runs."""

from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent


def load_module(source: str, dtype_code: int, *defines: str):
    """CuPy RawModule of `source` (a .cu file here) for one storage dtype (-DDT, dtype.cuh) and the
    given `-D` options; CuPy caches the compiled module on disk."""
    import cupy

    options = ("--std=c++17", f"-I{KERNEL_DIR}", f"-DDT={dtype_code}", *defines)
    return cupy.RawModule(code=(KERNEL_DIR / source).read_text(), options=options)
