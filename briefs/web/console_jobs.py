"""The console's jobs: the filterable list (keyset pages), one job's page, retry and cancel.

Retry and cancel are the queue's own operations (:func:`worker.queue.retry`, :func:`worker.queue.cancel`),
the ones the API and the CLI call; a refusal (the job is not failed, a live job has its dedup key …) is
shown on the job's page with status 409.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from briefs.web import queries
from briefs.web.console_common import page_href, redirect, render
from briefs.web.problems import Problem
from briefs.web.session import require_form, require_page
from briefs.web.state import web
from worker import queue

router = APIRouter(include_in_schema=False)

MAX_TYPE_CHARS = 200


def _filters(status: str, job_type: str, user_id: str) -> tuple[dict[str, Any], str | None]:
    """The list's filters from the form's text, and what was wrong with them (a bad one is dropped)."""
    problems = []
    clean_status = status if status in queries.JOB_STATUSES else None
    if status and clean_status is None:
        problems.append(f"there is no job status {status[:40]!r}")
    uid = int(user_id) if user_id.isdigit() and len(user_id) < 20 else None
    if uid is not None and not queries.is_bigint(uid):
        uid = None
    if user_id and uid is None:
        problems.append("a user id is a whole number")
    clean_type = job_type.strip()[:MAX_TYPE_CHARS] or None
    return {"status": clean_status, "type": clean_type, "user_id": uid}, "; ".join(problems) or None


@router.get("/jobs", dependencies=[Depends(require_page)])
async def jobs_page(request: Request, status: str = "", type: str = "", user_id: str = "",
                    cursor: str = "") -> Response:
    filters, error = _filters(status, type, user_id)
    try:
        page = await queries.list_jobs(web(request).db, status=filters["status"], job_type=filters["type"],
                                       user_id=filters["user_id"], cursor=cursor or None)
    except queries.BadCursor as exc:
        page, error, cursor = queries.Page(), str(exc), ""
    older = page_href("/jobs", {**filters, "cursor": page.next_cursor}) if page.next_cursor else None
    return render(request, "jobs.html", page=page, filters=filters, error=error,
                  statuses=queries.JOB_STATUSES, cursor=cursor, older_href=older,
                  first_href=page_href("/jobs", filters))


async def _job_or_404(request: Request, job_id: int) -> dict[str, Any]:
    job = await queries.get_job(web(request).db, job_id)
    if job is None:
        raise Problem(404, f"there is no job {job_id}")
    return job


@router.get("/jobs/{job_id}", dependencies=[Depends(require_page)])
async def job_page(request: Request, job_id: int) -> Response:
    return render(request, "job.html", job=await _job_or_404(request, job_id))


async def _refused(request: Request, job_id: int, reason: str) -> Response:
    return render(request, "job.html", 409, job=await _job_or_404(request, job_id), error=reason)


@router.post("/jobs/retry", dependencies=[Depends(require_form)])
async def retry_all(request: Request, type: str = Form("")) -> Response:
    job_type = type.strip()[:MAX_TYPE_CHARS]
    if not job_type:
        raise Problem(400, "say which job type to retry")
    back = page_href("/jobs", {"status": "failed", "type": job_type})
    try:
        async with web(request).db.raw() as conn:
            ids = await queue.retry(conn, job_type=job_type)
    except queue.QueueError as exc:
        jobs_filters = {"status": "failed", "type": job_type, "user_id": None}
        page = await queries.list_jobs(web(request).db, status="failed", job_type=job_type)
        return render(request, "jobs.html", 409, page=page, filters=jobs_filters, error=str(exc),
                      statuses=queries.JOB_STATUSES, cursor="", older_href=None, first_href=back)
    return redirect(back, "retried_all", n=len(ids)) if ids else redirect(back, "retried_none")


@router.post("/jobs/{job_id}/retry", dependencies=[Depends(require_form)])
async def retry_job(request: Request, job_id: int) -> Response:
    await _job_or_404(request, job_id)
    try:
        async with web(request).db.raw() as conn:
            await queue.retry(conn, job_id)
    except queue.QueueError as exc:
        return await _refused(request, job_id, str(exc))
    return redirect(f"/jobs/{job_id}", "retried")


@router.post("/jobs/{job_id}/cancel", dependencies=[Depends(require_form)])
async def cancel_job(request: Request, job_id: int) -> Response:
    await _job_or_404(request, job_id)
    try:
        async with web(request).db.raw() as conn:
            await queue.cancel(conn, job_id)
    except queue.QueueError as exc:
        return await _refused(request, job_id, str(exc))
    return redirect(f"/jobs/{job_id}", "cancelled")
