"""Prefect flows, one file per stage. Importing this package sets the stack's safe defaults.

These must be set before prefect, mlflow or img2dataset are imported (docs/design.md, known traps):
no analytics or update checks over a network we do not have, and an explicit MLflow tracking URI
because MLflow >= 3.13 refuses the old ./mlruns file store.
"""

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_name, _value)
