"""Manager middleware: frees the job's concurrency slot when it ends."""

from __future__ import annotations

from .base import Middleware, Pipeline


def release(pipeline: Pipeline, success: bool) -> None:
    """Free the slot of the pipeline's job, once."""
    assigns = pipeline.assigns
    if not assigns.get("released"):
        assigns["released"] = True
        assigns["services"].manager.job_terminated(assigns["queue"], success)


class ManagerMiddleware(Middleware):
    """Exq's Manager middleware: ``job_terminated(queue, success)``."""

    def after_processed_work(self, pipeline: Pipeline) -> None:
        release(pipeline, True)

    def after_failed_work(self, pipeline: Pipeline) -> None:
        release(pipeline, False)
