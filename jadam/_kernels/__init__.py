"""jadam's compiled kernels and their glue.

- `build`: compiles the C++ sources shipped with the package at first use and
  registers them as XLA FFI targets (CPU only);
- `fused`: finds the Adam stages in a transformation and calls the kernel in
  place of the generic XLA step;
- `sparse_step`: the same for `jadam.sparse_adam` on row-sparse gradients, one
  call of the SparseAdam kernel (`sparse_adam_cpu.cc`) per table.
"""
