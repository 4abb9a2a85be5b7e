-- GGUF exports of versions, the llama.cpp checks run on each, and aliases (production, staging, ...) that point a
-- model name at one export. Every promotion, refused promotion and rollback is a row of `promotions`; the alias
-- table is the current state that history leads to.
CREATE TABLE exports (
    export_id    VARCHAR PRIMARY KEY,     -- NAME/TAG: the folder exports/NAME/TAG (TAG: vN-QUANT)
    version      VARCHAR NOT NULL REFERENCES versions(version),
    quant        VARCHAR NOT NULL,        -- f32 | f16 | q8_0 | q4_k_m | ...
    path         VARCHAR NOT NULL,        -- the export folder (GGUF + Modelfile + checks.json)
    gguf_file    VARCHAR NOT NULL,
    size_bytes   BIGINT NOT NULL,
    sha256       VARCHAR NOT NULL,
    modelfile    VARCHAR NOT NULL,        -- the Modelfile's text
    passed       BOOLEAN NOT NULL,        -- every pass/fail check passed
    info_json    VARCHAR NOT NULL DEFAULT '{}',
    created_utc  TIMESTAMP NOT NULL
);

CREATE TABLE export_checks (
    export_id    VARCHAR NOT NULL,        -- (no foreign key: DuckDB cannot replace a referenced row in one transaction)
    name         VARCHAR NOT NULL,        -- loads, tokenization, greedy, template, perplexity, mean_kl, ...
    file         VARCHAR NOT NULL,        -- the GGUF the check ran on (the F16 intermediate or the final file)
    passed       BOOLEAN,                 -- NULL: a measurement, not a pass/fail check
    value        DOUBLE,
    detail       VARCHAR NOT NULL DEFAULT '',
    recorded_utc TIMESTAMP NOT NULL
);

CREATE SEQUENCE promotion_ids START 1;

CREATE TABLE promotions (
    id                  INTEGER PRIMARY KEY DEFAULT nextval('promotion_ids'),
    name                VARCHAR NOT NULL,
    alias               VARCHAR NOT NULL,
    action              VARCHAR NOT NULL, -- promote | refused | rollback
    version             VARCHAR NOT NULL, -- promote/rollback: the alias's new holder; refused: the candidate
    export_id           VARCHAR,
    previous_version    VARCHAR,          -- the holder before this row (NULL for a first promotion)
    previous_export_id  VARCHAR,
    gate_json           VARCHAR NOT NULL DEFAULT '{}',
    ollama              VARCHAR,          -- what `ollama create` did, or why it did not run
    recorded_utc        TIMESTAMP NOT NULL
);

CREATE TABLE aliases (
    name        VARCHAR NOT NULL,
    alias       VARCHAR NOT NULL,
    version     VARCHAR NOT NULL,
    export_id   VARCHAR NOT NULL,
    updated_utc TIMESTAMP NOT NULL,
    PRIMARY KEY (name, alias)
);
