-- An id for this registry file, made once. Prefect's cache keys for stages include it, so results cached for
-- another registry (or for this one before it was recreated) are never reused.
CREATE TABLE registry_instance (id VARCHAR NOT NULL);
INSERT INTO registry_instance VALUES (uuid()::VARCHAR);
