"""Prefect flows: ``pipeline`` (the whole DAG) and the stage groups ``prepare``, ``train``, ``report``."""
import tasks  # noqa: F401  (sets Prefect's offline defaults before Prefect is imported)
