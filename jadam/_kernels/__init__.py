"""jadam's compiled kernels and their glue.

- `build`: compiles the C++ sources shipped with the package at first use and
  registers them as XLA FFI targets (CPU only);
- `fused`: finds the Adam stages in a transformation and calls the kernel in
  place of the generic XLA step;
- `sparse_step`: the same for `jadam.sparse_adam` on row-sparse gradients, one
  call of the SparseAdam kernel (`sparse_adam_cpu.cc`) per table;
- `plan`: reads the stages' registry records and serves a step with a kernel,
  or refuses;
- `dispatch`: binds a served step as one primitive, lowered to the kernel for
  this CPU and to the stages themselves everywhere else (export, other
  platforms, vmap, derivatives).
"""
