"""The stages: each formula of the optimizers, stated once."""
