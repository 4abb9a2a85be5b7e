"""The registry (DuckDB in TUNERY_HOME, or PostgreSQL): every model version, its lineage, hyperparameters, data
and metrics.

All SQL of tunery lives in this package; callers use the functions of `registry.store` (versions, metrics,
lineage) and `registry.exports` (GGUF exports, their checks, aliases, promotions).
"""
from registry import exports  # noqa: F401
from registry.records import Version, VersionInfo  # noqa: F401
from registry.store import (  # noqa: F401
    children,
    compare_versions,
    facets,
    create_version,
    fail_version,
    finish_version,
    get_answers,
    get_history,
    get_judgements,
    get_version,
    import_versions,
    instance_id,
    find_fingerprint,
    lineage,
    lineage_graph,
    list_versions,
    record_dataset,
    record_answers,
    record_history,
    record_judgements,
    record_metrics,
    record_samples,
    resolve,
    settle_interrupted,
    version_table,
)
