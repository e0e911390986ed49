"""How a moment is stored: bfloat16 with stochastic rounding, 8-bit blocks."""
