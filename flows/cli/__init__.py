"""The `tunery` command: app.py (the application and its error handling), train.py (run, sweep, prep, the stage
commands, eval), ship.py (export, promote, rollback, chat, dashboard, serve, setup), look.py (models, show, lineage,
compare, registry copy), render.py (how a version's report and results are drawn)."""
# isort: off
# Each module registers its commands on the app; `tunery --help` lists them in this order.
from flows.cli import train, ship, look  # noqa: F401
from flows.cli.app import app
# isort: on


def main() -> None:
    app()
