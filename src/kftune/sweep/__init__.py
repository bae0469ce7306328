"""Hyperparameter search on Ray Tune (`kftune sweep`): a search space over run-config fields
(`space.py`), checked before any trial; each trial the train step's own Ray Train run
(`trial.py`), stopped early by ASHA on the validation metric it reports during training; every
trial an MLflow child run under one parent (`tracking.py`), which gets the HTML report
(`report.py`); `run.py` ties them together and writes the best config."""
