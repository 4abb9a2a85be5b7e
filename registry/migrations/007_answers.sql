-- A version's greedy answers to the held-out prompts with the reference answers they are scored against, through
-- transformers (`backend` 'hf') or an export's GGUF through llama.cpp (`backend` the export id). Each evaluation adds
-- a set; the newest set per backend and data is the one shown and judged.
CREATE TABLE answers (
    version        VARCHAR NOT NULL REFERENCES versions(version),
    backend        VARCHAR NOT NULL,
    position       INTEGER NOT NULL,
    prompt         VARCHAR NOT NULL,
    reference      VARCHAR NOT NULL,
    answer         VARCHAR NOT NULL,
    category       VARCHAR,
    eval_data_hash VARCHAR,
    recorded_utc   TIMESTAMP NOT NULL
);
-- A judge's verdicts on two versions' answers to the same held-out prompt: each pair asked twice, the version's
-- answer shown first (`first`) and second (`second`); each verdict names the winning version's side ('version',
-- 'against', 'tie') after undoing the swap, and `outcome` is the pair's result for `version` (win / loss / tie).
CREATE TABLE judgements (
    version        VARCHAR NOT NULL REFERENCES versions(version),
    against        VARCHAR NOT NULL REFERENCES versions(version),
    judge          VARCHAR NOT NULL,
    position       INTEGER NOT NULL,
    prompt         VARCHAR NOT NULL,
    first          VARCHAR NOT NULL,
    second         VARCHAR NOT NULL,
    outcome        VARCHAR NOT NULL,
    eval_data_hash VARCHAR,
    recorded_utc   TIMESTAMP NOT NULL
);
