-- The LLM circuit breaker's shared record (briefs.circuit): one row per provider configuration, keyed by a
-- fingerprint of the base URL and the API key (never the key itself), so a process started with another key
-- or base URL gets a circuit of its own. Every worker process keeps its own breaker and reads this row (cached
-- a second or two) so that none of them calls a provider another process found broken; `briefs status`,
-- /healthz and the console show it, `briefs llm reset` closes it. generation grows with every write: a process
-- adopts a row whose generation is newer than the one it last saw.
CREATE TABLE llm_circuit (
    circuit_key   text PRIMARY KEY,
    provider      text NOT NULL DEFAULT '',
    state         text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    reason        text,
    since         timestamptz NOT NULL DEFAULT now(),
    next_probe_at timestamptz,  -- NULL while open: no automatic probe (401/403: until reset or reconfigured)
    sticky        boolean NOT NULL DEFAULT false,
    opened_count  integer NOT NULL DEFAULT 0,
    generation    bigint NOT NULL DEFAULT 1,
    updated_by    text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
