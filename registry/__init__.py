"""The registry (DuckDB in TUNERY_HOME, or PostgreSQL): every model version, its lineage, hyperparameters, data
and metrics.

All SQL of tunery lives in this package; callers use the functions of `registry.store` (versions and what is
recorded with them), `registry.views` (lineage, comparisons, the version table) and `registry.exports` (GGUF
exports, their checks, aliases, promotions), which return the typed records of `registry.records`.
"""
from registry import exports  # noqa: F401
from registry.records import Version, VersionInfo  # noqa: F401
from registry.store import (create_version, fail_version, find_fingerprint, finish_version, get_answers,  # noqa: F401
                            get_judgements, get_version, import_versions, instance_id, list_versions, record_answers,
                            record_dataset, record_history, record_judgements, record_metrics, record_samples, resolve,
                            settle_interrupted)
from registry.views import (children, compare_versions, facets, get_history, lineage, lineage_graph,  # noqa: F401
                            version_table)
