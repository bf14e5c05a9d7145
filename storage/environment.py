"""The stack's safe environment defaults, set on import, before prefect, mlflow or img2dataset is.

Every entry point imports this module first (through `storage`, `clip_model`, `tasks` or
`flows`): no analytics or update checks over a network we do not have (docs/design.md, traps 3
and 4), and an explicit MLflow tracking URI because MLflow >= 3.13 refuses the old ./mlruns file
store (trap 6). Prefect's temporary server gets two minutes to start instead of 20 s: on a busy
machine (a laptop building, CI running tests beside it) its start took longer and `make sample`
died before its first stage. A value already in the environment wins.
"""

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
    "WANDB_MODE": "disabled",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

for _name, _value in DEFAULTS.items():
    os.environ.setdefault(_name, _value)
