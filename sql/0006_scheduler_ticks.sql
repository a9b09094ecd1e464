-- The scheduler's log of ticks, for processes other than the scheduler (the web console shows the last
-- tick). One row per tick the daemon ran, failed ones included (ok false, error set), and per one-user
-- tick its caller recorded (user_id set). tick_at is the tick's own "now"; report is the tick's report
-- with its lists cut to a bounded length. The writer prunes the log as it writes (a week, 10,000 rows).
CREATE TABLE scheduler_ticks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tick_at     timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    duration_s  double precision,
    ok          boolean NOT NULL,
    user_id     bigint,
    summary     text,
    report      jsonb,
    error       text
);

-- The latest ticks first, and the pruning of the old ones.
CREATE INDEX scheduler_ticks_finished ON scheduler_ticks (finished_at DESC, id DESC);
