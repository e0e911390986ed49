"""What every stage leans on: hyperparameter checks and schedules, dtypes, tree helpers. Imports nothing else of jadam."""
