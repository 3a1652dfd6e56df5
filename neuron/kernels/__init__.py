"""CUDA kernels as .cu/.cuh sources, their CuPy launchers, and the NumPy mirror of each kernel.

The mirrors follow the kernels' arithmetic (float32 accumulation, the same split and combine
order) so CPU CI exercises the bookkeeping (block tables, splits, masks) that the GPU runs."""
