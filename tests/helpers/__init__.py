"""Shared test helpers: NumPy float64 references, the parity harness, bit comparisons, the torch front harness."""
