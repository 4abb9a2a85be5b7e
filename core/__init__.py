"""The shared kernel that `registry/`, `tasks/`, `flows/` and `dashboard/` all stand on; it imports nothing else of
tunery. `errors`: TuneryError and name checks · `home`: TUNERY_HOME and atomic folders · `files`: JSON and hashes ·
`metrics`: the metric catalogue (every metric's unit, direction, format and group, declared once)."""
