"""The JSON API under ``/api/v1``: every route needs the admin token or a console session."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from briefs.web.session import require_api

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_api)])
