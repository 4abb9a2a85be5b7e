-- Which process runs a `running` version (host, pid, process start time as JSON), so the next process can tell a
-- version whose process is gone (killed, out of memory) from one still training, and settle it as failed.
ALTER TABLE versions ADD COLUMN owner_json VARCHAR;
