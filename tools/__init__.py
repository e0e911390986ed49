"""Scripts that are not tests: golden trajectories and parity reports (run as `python -m tools.<name>`)."""
