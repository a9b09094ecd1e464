-- `briefs status` reads the last hour's finished briefs (LLM health): by completion time, not a scan.
CREATE INDEX daily_briefs_completed ON daily_briefs (completed_at) WHERE completed_at IS NOT NULL;
