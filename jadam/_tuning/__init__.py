"""Tuning: the plateau rule, early stopping, sweeps."""
