"""What every stage leans on: hyperparameters (`hparams`), dtypes and tree helpers (`common`). Imports no jadam."""
