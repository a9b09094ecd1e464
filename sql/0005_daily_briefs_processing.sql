-- The scheduler looks, once per tick, for briefs left 'processing' by a job that ended (a worker killed
-- on the last attempt): only the few processing rows, through this index, never the whole history.
CREATE INDEX daily_briefs_processing ON daily_briefs (user_id, brief_date) WHERE status = 'processing';
