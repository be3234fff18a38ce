"""The device side of fedplan: runtime, stores and the Celery worker (``celery -A consumer``)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """``consumer.app`` / ``consumer.celery``: the Celery app, imported on first use only."""
    if name in ("app", "celery"):
        from consumer.worker.celery_app import app

        return app
    raise AttributeError(f"module 'consumer' has no attribute {name!r}")
