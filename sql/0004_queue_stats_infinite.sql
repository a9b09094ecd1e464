-- queue_stats: a pending row with run_at = '-infinity' (hostile or hand-written) made
-- `SELECT * FROM queue_stats` fail ("cannot subtract infinite timestamps"). Only finite
-- instants count towards the oldest pending age; the rows themselves are still counted.
CREATE OR REPLACE VIEW queue_stats AS
SELECT job_type,
       status,
       count(*) AS jobs,
       max(now() - run_at) FILTER (WHERE status = 'pending' AND run_at <= now() AND isfinite(run_at))
           AS oldest_pending_age,
       min(run_at) FILTER (WHERE status = 'pending') AS next_run_at,
       max(attempts) AS max_attempts_used
FROM queue_jobs
GROUP BY job_type, status;
