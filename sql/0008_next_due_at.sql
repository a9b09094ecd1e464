-- A tick that costs what is due. Each preference keeps the instant from which the tick must look at it
-- again (next_due_at, UTC), and a tick reads only the preferences due before the end of its lookahead
-- (plus the users with pending scheduler jobs); scheduler/tick.py explains the rules.
--
-- next_due_at is a cache the tick writes after planning a user. It is never trusted blindly:
-- applications write users and brief_preferences directly, so every change that can move a brief sets
-- it NULL ("unknown: plan me") in the same transaction as the change, through the triggers below:
-- a new preference, a change of frequency, weekday, time of day or activity, a change of the user's
-- timezone, and a brief job that ends failed or cancelled, or is deleted while live (the tick makes a
-- new job for a brief whose job failed, as long as the brief is in its window).
ALTER TABLE brief_preferences ADD COLUMN next_due_at timestamptz;

-- The tick's selection: next_due_at IS NULL OR next_due_at < now + lookahead, among active preferences.
-- On next_due_at (not user_id): the due users are a small range of it, read as such; the tick sorts
-- the ids it gets and pages through them by primary key (bench/README-scheduler.md has the numbers).
CREATE INDEX brief_preferences_next_due ON brief_preferences (next_due_at) WHERE is_active;

-- The tz database version the stored next_due_at values were computed with (one row). A tick that
-- runs with another version sets every next_due_at NULL and stores its own, in its transaction.
CREATE TABLE scheduler_tzdata (
    only_row   boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    version    text        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION briefs_next_due_unknown() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.next_due_at := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER brief_preferences_next_due_insert BEFORE INSERT ON brief_preferences
    FOR EACH ROW EXECUTE FUNCTION briefs_next_due_unknown();

CREATE TRIGGER brief_preferences_next_due_update
    BEFORE UPDATE OF frequency, day_of_week, time_of_day, is_active ON brief_preferences
    FOR EACH ROW
    WHEN (OLD.frequency IS DISTINCT FROM NEW.frequency OR OLD.day_of_week IS DISTINCT FROM NEW.day_of_week
          OR OLD.time_of_day IS DISTINCT FROM NEW.time_of_day OR OLD.is_active IS DISTINCT FROM NEW.is_active)
    EXECUTE FUNCTION briefs_next_due_unknown();

-- For the triggers on other tables: the preference of the row's user (NEW's, else OLD's) is unknown.
CREATE FUNCTION briefs_user_next_due_unknown() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    uid bigint;
BEGIN
    IF TG_TABLE_NAME = 'users' THEN
        uid := NEW.id;
    ELSIF TG_OP = 'DELETE' THEN
        uid := OLD.user_id;
    ELSE
        uid := NEW.user_id;
    END IF;
    UPDATE brief_preferences SET next_due_at = NULL WHERE user_id = uid AND next_due_at IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_next_due_timezone AFTER UPDATE OF timezone ON users
    FOR EACH ROW WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)
    EXECUTE FUNCTION briefs_user_next_due_unknown();

-- Brief jobs only (briefs.contract.BRIEF_JOB); the WHEN clauses keep the queue's claims and completions
-- from calling anything.
CREATE TRIGGER queue_jobs_next_due_ended AFTER UPDATE OF status ON queue_jobs
    FOR EACH ROW
    WHEN (NEW.status IN ('failed', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.job_type = 'generate_daily_brief' AND NEW.user_id IS NOT NULL)
    EXECUTE FUNCTION briefs_user_next_due_unknown();

CREATE TRIGGER queue_jobs_next_due_deleted AFTER DELETE ON queue_jobs
    FOR EACH ROW
    WHEN (OLD.status IN ('pending', 'processing') AND OLD.job_type = 'generate_daily_brief'
          AND OLD.user_id IS NOT NULL)
    EXECUTE FUNCTION briefs_user_next_due_unknown();
