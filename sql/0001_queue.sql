-- The job queue. Jobs are rows; workers claim them with FOR UPDATE SKIP LOCKED.
CREATE TABLE queue_jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_type         text        NOT NULL,
    payload          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    priority         smallint    NOT NULL DEFAULT 100,          -- lower runs first
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    dedup_key        text,
    user_id          bigint,
    notify_at        timestamptz,
    locked_by        text,
    lease_expires_at timestamptz,
    processing_token uuid,
    heartbeat_at     timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    last_error       text,
    result           jsonb,
    progress         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queue_jobs_processing_has_lease
        CHECK (status <> 'processing' OR (processing_token IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- At most one live (pending or running) job per dedup key. Finished rows do not
-- block: the scheduler's dedup query also looks at completed jobs, and a failed
-- or cancelled brief may be scheduled again.
CREATE UNIQUE INDEX queue_jobs_dedup_live
    ON queue_jobs (dedup_key)
    WHERE dedup_key IS NOT NULL AND status IN ('pending', 'processing');

-- Lookups by dedup key over all statuses (the scheduler's IN query).
CREATE INDEX queue_jobs_dedup_key ON queue_jobs (dedup_key) WHERE dedup_key IS NOT NULL;

-- The claim index: only runnable rows, in claim order. History never slows claiming.
CREATE INDEX queue_jobs_claim ON queue_jobs (priority, run_at, id) WHERE status = 'pending';

-- The rescuer's index: running rows by lease expiry.
CREATE INDEX queue_jobs_lease ON queue_jobs (lease_expires_at) WHERE status = 'processing';

-- The pruner's index: finished rows by age.
CREATE INDEX queue_jobs_finished ON queue_jobs (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled');

CREATE INDEX queue_jobs_user ON queue_jobs (user_id, job_type) WHERE user_id IS NOT NULL;

-- For humans: counts per job type and status, and how long the oldest runnable job has waited.
CREATE VIEW queue_stats AS
SELECT job_type,
       status,
       count(*) AS jobs,
       max(now() - run_at) FILTER (WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age,
       min(run_at) FILTER (WHERE status = 'pending') AS next_run_at,
       max(attempts) AS max_attempts_used
FROM queue_jobs
GROUP BY job_type, status;

-- For humans: failed jobs, newest first, with their errors.
CREATE VIEW queue_failures AS
SELECT id, job_type, user_id, dedup_key, attempts, max_attempts, last_error, payload,
       created_at, started_at, finished_at
FROM queue_jobs
WHERE status = 'failed'
ORDER BY finished_at DESC NULLS LAST, id DESC;
