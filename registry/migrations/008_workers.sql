-- Several machines share one registry: which worker (host) made each version, and the order of an export's checks
-- as a column (PostgreSQL has no rowid to keep insertion order by).
ALTER TABLE versions ADD COLUMN host VARCHAR;
ALTER TABLE export_checks ADD COLUMN position INTEGER;
-- only: duckdb
UPDATE export_checks SET position = rowid;
-- Lookups by version on PostgreSQL (DuckDB scans these tables fast enough without them).
-- only: postgresql
CREATE INDEX metrics_version ON metrics (version);
-- only: postgresql
CREATE INDEX parents_version ON version_parents (version);
-- only: postgresql
CREATE INDEX parents_parent ON version_parents (parent);
-- only: postgresql
CREATE INDEX history_version ON training_history (version);
-- only: postgresql
CREATE INDEX samples_version ON samples (version);
-- only: postgresql
CREATE INDEX answers_version ON answers (version);
-- only: postgresql
CREATE INDEX judgements_version ON judgements (version);
-- only: postgresql
CREATE INDEX checks_export ON export_checks (export_id);
