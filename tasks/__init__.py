"""Prefect tasks: the work each flow orchestrates, small and testable on its own."""

import flows  # noqa: F401  (sets the environment defaults before prefect/mlflow import)
