"""Prefect tasks: the work each flow orchestrates, small and testable on its own."""

import storage.environment  # noqa: F401  (safe defaults before prefect/mlflow are imported)
