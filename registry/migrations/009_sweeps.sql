-- Hyperparameter sweeps (`tunery sweep`): one row per sweep, and one per trial with the values it tried, the version
-- it left (its last stage's) and the metric it scored. A failed trial keeps its row with the error.
CREATE TABLE sweeps (
    sweep_id     VARCHAR PRIMARY KEY,
    name         VARCHAR NOT NULL,        -- the config's model name
    config       VARCHAR NOT NULL,        -- the config file the trials vary
    method       VARCHAR NOT NULL,        -- grid | tpe | random
    metric       VARCHAR NOT NULL,        -- what picks the best trial (a metric of the held-out evaluation)
    direction    VARCHAR NOT NULL,        -- minimize | maximize
    space_json   VARCHAR NOT NULL,        -- the swept keys and their values or ranges
    status       VARCHAR NOT NULL,        -- running | done | failed
    best_trial   INTEGER,
    host         VARCHAR,
    created_utc  TIMESTAMP NOT NULL,
    finished_utc TIMESTAMP
);

CREATE TABLE sweep_trials (
    sweep_id     VARCHAR NOT NULL,
    trial        INTEGER NOT NULL,        -- 0, 1, ... in the order the trials were asked for
    values_json  VARCHAR NOT NULL,        -- {key: value} for every swept key
    status       VARCHAR NOT NULL,        -- running | ready | failed
    version      VARCHAR,                 -- the version the trial's last stage left
    value        DOUBLE,                  -- the metric
    seconds      DOUBLE,                  -- wall time of the trial
    error        VARCHAR,
    host         VARCHAR,
    flow_run_id  VARCHAR,
    created_utc  TIMESTAMP NOT NULL,
    finished_utc TIMESTAMP,
    PRIMARY KEY (sweep_id, trial)
);
