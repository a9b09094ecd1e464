-- LLM cost accounting (BRIEFS_LLM_PRICES): what a brief's LLM calls cost, in the price table's currency
-- (metadata.cost_currency). NULL: unknown (a call of a model without a price, or a brief written before
-- this column); 0 for a brief that made no LLM call. Today's and this month's spend (the daily budget,
-- `briefs status`, the console) are sums over daily_briefs_completed (completed_at).
ALTER TABLE daily_briefs ADD COLUMN cost numeric;
