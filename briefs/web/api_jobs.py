"""``/api/v1/jobs``: the queue's jobs, page by page, one job whole, and the operator's retry and cancel
(:func:`worker.queue.retry` and :func:`worker.queue.cancel`: one implementation of each)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from briefs.web import queries
from briefs.web.problems import Problem
from briefs.web.schemas import CancelResult, JobDetail, JobPage, RetryResult, Text, problems
from briefs.web.state import web
from worker import queue

router = APIRouter(tags=["jobs"], responses=problems(401, 403, 422))

Status = Literal["pending", "processing", "completed", "failed", "cancelled"]
Limit = Annotated[int, Query(ge=1, le=queries.MAX_LIMIT, description="rows per page, 1..200")]
Cursor = Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page")]


def bad_cursor(exc: queries.BadCursor) -> Problem:
    return Problem(422, str(exc), errors=[{"field": "query.cursor", "message": str(exc)}])


@router.get("/jobs", summary="List jobs, newest first (keyset pagination)", response_model=JobPage)
async def list_jobs(
    request: Request,
    status: Status | None = None,
    job_type: Annotated[Text | None, Query(alias="type", max_length=200)] = None,
    user_id: int | None = None,
    limit: Limit = queries.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    try:
        page = await queries.list_jobs(web(request).db, status=status, job_type=job_type, user_id=user_id,
                                       limit=limit, cursor=cursor)
    except queries.BadCursor as exc:
        raise bad_cursor(exc) from None
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/jobs/{job_id}", summary="One job: every column, payload, result and progress included",
            response_model=JobDetail, responses=problems(404))
async def get_job(request: Request, job_id: int) -> dict[str, Any]:
    job = await queries.get_job(web(request).db, job_id)
    if job is None:
        raise Problem(404, f"no job with id {job_id}")
    return job


@router.post("/jobs/retry", summary="Retry every failed job of one type", response_model=RetryResult,
             responses=problems(409))
async def retry_type(
    request: Request, job_type: Annotated[Text, Query(alias="type", min_length=1, max_length=200)]
) -> dict[str, Any]:
    try:
        async with web(request).db.raw() as conn:
            ids = await queue.retry(conn, job_type=job_type)
    except queue.QueueError as exc:
        raise Problem(409, str(exc)) from None
    return {"retried": ids}


async def _exists(request: Request, job_id: int) -> None:
    if not queries.is_bigint(job_id) or await queries.get_job(web(request).db, job_id) is None:
        raise Problem(404, f"no job with id {job_id}")


@router.post("/jobs/{job_id}/retry", summary="Retry a failed or cancelled job (409 with the reason otherwise)",
             response_model=RetryResult, responses=problems(404, 409))
async def retry_job(request: Request, job_id: int) -> dict[str, Any]:
    await _exists(request, job_id)
    try:
        async with web(request).db.raw() as conn:
            ids = await queue.retry(conn, job_id)
    except queue.QueueError as exc:
        await _exists(request, job_id)  # deleted meanwhile (pruned): 404, not 409
        raise Problem(409, str(exc)) from None
    return {"retried": ids}


@router.post("/jobs/{job_id}/cancel", summary="Cancel a pending or running job (409 with the reason otherwise)",
             response_model=CancelResult, responses=problems(404, 409))
async def cancel_job(request: Request, job_id: int) -> dict[str, Any]:
    await _exists(request, job_id)
    try:
        async with web(request).db.raw() as conn:
            status = await queue.cancel(conn, job_id)
    except queue.QueueError as exc:
        await _exists(request, job_id)
        raise Problem(409, str(exc)) from None
    return {"id": job_id, "status": status}
