"""Prefect flows, one file per stage; `python -m flows.<stage> --help` for each command line.

The command lines (flows/cli.py) parse and validate before Prefect or torch is imported.
"""

import storage.environment  # noqa: F401  (safe defaults before prefect/mlflow are imported)
