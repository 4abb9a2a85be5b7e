"""The `tunery` application: its console, the `command` decorator (a user's error is one line on stderr and exit
status 1, never a traceback) and JSON output."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from typing import Any, Callable

import typer
from rich.console import Console

from core.errors import TuneryError
from core.home import home

# Stdout carries a command's own output only (one JSON document with --json); whatever libraries print while a
# command runs (trainer log lines, progress) goes to stderr.
STDOUT = sys.stdout
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrain small language models on a schedule and keep every result comparable.")
# Piped output gets a wide console so version names are not cut; a terminal uses its own width.
out = Console(file=STDOUT, width=None if STDOUT.isatty() else 160)
err = Console(stderr=True)

JsonOpt = typer.Option(False, "--json", help="Print one JSON document to stdout.")
registry_app = typer.Typer(no_args_is_help=True, help="The registry itself: copy it to another backend.")
app.add_typer(registry_app, name="registry")


def _prefect_env() -> None:
    """Keep Prefect's state with tunery's unless the user points Prefect elsewhere; no telemetry."""
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like Ctrl-C's KeyboardInterrupt."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def command(fn: Callable | None = None, *, name: str | None = None, group: typer.Typer | None = None) -> Callable:
    """Register a CLI command (of `group`, else top level) whose TuneryError becomes a one-line message and exit
    status 1."""
    if fn is None:
        return functools.partial(command, name=name, group=group)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # SIGTERM unwinds like Ctrl-C, so what the command started (Prefect's temporary server, a training child)
        # is stopped by its own clean-up and exit handlers instead of outliving it. Prefect's runner (`tunery
        # serve`) installs its own graceful handler over this one.
        signal.signal(signal.SIGTERM, _terminated)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                import registry

                if registry.db.exists():  # versions whose process was killed: settle them as failed first
                    for version in registry.settle_interrupted():
                        err.print(f"{version}: its process ended before it finished; marked failed (interrupted)")
                return fn(*args, **kwargs)
        except TuneryError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            err.print("terminated" if isinstance(e, Terminated) else "interrupted")
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

    return (group or app).command(name=name)(wrapper)


def _jsonable(obj: Any) -> Any:
    """json.dumps' fallback: a registry record (Version, Export, Alias, ...) as its JSON object, anything else as
    text."""
    return obj.json() if callable(getattr(obj, "json", None)) else str(obj)


def _print_json(obj: Any) -> None:
    STDOUT.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    STDOUT.flush()
