-- Model versions and what was measured about them. Values that are objects are stored as JSON text (_json).
CREATE TABLE model_names (
    name VARCHAR PRIMARY KEY,
    last_number INTEGER NOT NULL          -- version numbers count up per name and are never reused
);

CREATE TABLE versions (
    version VARCHAR PRIMARY KEY,          -- NAME:N
    name VARCHAR NOT NULL,
    number INTEGER NOT NULL,
    stage VARCHAR NOT NULL,               -- base | sft | ...
    status VARCHAR NOT NULL,              -- running | ready | failed
    base_model VARCHAR,
    hyperparameters_json VARCHAR NOT NULL DEFAULT '{}',
    data_hash VARCHAR,
    artifact_path VARCHAR,
    info_json VARCHAR NOT NULL DEFAULT '{}',
    error VARCHAR,
    flow_run_id VARCHAR,
    created_utc TIMESTAMP NOT NULL,
    finished_utc TIMESTAMP,
    UNIQUE (name, number)
);

CREATE TABLE version_parents (
    version VARCHAR NOT NULL,
    parent VARCHAR NOT NULL,
    position INTEGER NOT NULL,            -- order of parents as given (merges have several)
    PRIMARY KEY (version, parent)
);

CREATE TABLE metrics (
    version VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    eval_data_hash VARCHAR,               -- the data a metric was measured on; NULL for training figures
    recorded_utc TIMESTAMP NOT NULL
);

CREATE TABLE training_history (
    version VARCHAR NOT NULL,
    step INTEGER NOT NULL,
    epoch DOUBLE,
    name VARCHAR NOT NULL,                -- loss, learning_rate, grad_norm, rss_mb, eval_loss, ...
    value DOUBLE NOT NULL
);

CREATE TABLE datasets (
    data_hash VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    train_rows INTEGER NOT NULL,
    validation_rows INTEGER NOT NULL,
    info_json VARCHAR NOT NULL DEFAULT '{}',
    created_utc TIMESTAMP NOT NULL
);
