-- The console's and the API's lists and searches at production size (1,000,000 jobs, 100,000 users):
-- every page reads a few index entries, never the table. bench/web_bench.py measures them; the numbers
-- and the cost to the queue are in bench/README-web.md.

-- Failed and cancelled jobs, newest first (/jobs?status=failed, with or without a type): the primary key
-- finds them only by reading every completed job in between, and failures are rare. Partial, so the
-- queue's hot path (insert pending, claim, complete) never writes it: only a job that fails or is
-- cancelled adds an entry.
CREATE INDEX IF NOT EXISTS queue_jobs_failed ON queue_jobs (id) WHERE status IN ('failed', 'cancelled');

-- Jobs of one type newest first (/jobs?type=…), for every type but the two the queue is made of. Those two
-- are most of the table, so walking the primary key meets their newest rows at once; any other type may
-- be rare or bunched in the past (a weekly job, a type no longer made, a name that does not exist), and
-- the primary key would then read the whole history to find a page. Partial, so brief and email jobs
-- never write it; the names are briefs.contract.BRIEF_JOB and EMAIL_JOB.
CREATE INDEX IF NOT EXISTS queue_jobs_other_types ON queue_jobs (job_type, id)
    WHERE job_type NOT IN ('generate_daily_brief', 'send_brief_email');

-- User search (/users?query=…): the start of an email or a name, in any case. text_pattern_ops, so
-- `left(lower(email), 200) LIKE lower('emma.s%')` is a range scan whatever the database's collation.
-- The first 200 characters only: a btree entry holds at most 2,704 bytes, and the application that owns
-- users may write a name of any length (indexing it whole would make such an INSERT fail).
CREATE INDEX IF NOT EXISTS users_email_prefix ON users (left(lower(email), 200) text_pattern_ops);
CREATE INDEX IF NOT EXISTS users_name_prefix ON users (left(lower(name), 200) text_pattern_ops);

-- The planner needs the statistics of lower(email) and lower(name) to choose the new indexes (until the
-- next autovacuum it has none): a sample of the users table, a fraction of a second at 100,000 users.
ANALYZE users;
