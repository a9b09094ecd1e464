"""The Postgres-backed job queue and its worker.

Jobs are rows in ``queue_jobs``; workers claim them with ``SELECT … FOR UPDATE
SKIP LOCKED``. :mod:`worker.queue` holds every statement that touches the queue.
"""
