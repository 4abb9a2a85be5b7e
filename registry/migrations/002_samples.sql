-- Sample answers of a version to the eval config's fixed prompts, stripped of special tokens. Each evaluation adds
-- a set; the newest set is the one shown.
CREATE TABLE samples (
    version        VARCHAR NOT NULL REFERENCES versions(version),
    position       INTEGER NOT NULL,
    prompt         VARCHAR NOT NULL,
    answer         VARCHAR NOT NULL,
    eval_data_hash VARCHAR,
    recorded_utc   TIMESTAMP NOT NULL
);
