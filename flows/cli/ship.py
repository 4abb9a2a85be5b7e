"""`tunery export`, `promote`, `rollback`, `chat`, `dashboard`, `serve` and `setup`."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from core.errors import TuneryError
from flows.cli.app import STDOUT, JsonOpt, _prefect_env, _print_json, command, err, out
from flows.cli.render import _print_checks, _print_promotion

# ---------------------------------------------------------------- export, promote, rollback

QuantOpt = typer.Option(None, "--quant", help="f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ...; default: the "
                                              "config's export.quant (q4_k_m).")
ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline YAML whose data (held-out checks), eval prompts, "
                                                      "export and promote settings to use; default: the demo's.")




@command
def export(version: str = typer.Argument(..., help="NAME:N or NAME."), quant: Optional[str] = QuantOpt,
           config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Write a version as GGUF + Modelfile under TUNERY_HOME/exports/NAME/vN-QUANT and check it with llama.cpp."""
    from flows.promotion import export_from_config

    result = export_from_config(version, config, quant, progress=err.print)
    if as_json:
        _print_json(result)
        return
    _print_checks(result)
    out.print(f"{result['path']} ({'all checks passed' if result['passed'] else 'SOME CHECKS FAILED'})")


@command
def promote(version: str = typer.Argument(..., help="NAME:N or NAME."),
            alias: Optional[str] = typer.Option(None, "--alias", help="Default: the config's promote.alias, "
                                                                       "else production."),
            quant: Optional[str] = QuantOpt, config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Export, check and gate a version; on a pass move NAME@ALIAS to it (and `ollama create` where installed)."""
    from flows.promotion import promote_from_config, refused_message

    result = promote_from_config(version, config, alias, quant, progress=err.print)
    if as_json:
        _print_json(result)
    else:
        _print_checks(result["export"])
        _print_promotion(result)
    if not result["promoted"]:
        raise TuneryError(refused_message(result))


@command
def rollback(alias: str = typer.Argument(..., help="NAME@ALIAS, e.g. fern@production."),
             as_json: bool = JsonOpt) -> None:
    """Move NAME@ALIAS, its export folder link and Ollama's model back to the version it held before."""
    from flows.promotion import rollback as run_rollback

    result = run_rollback(alias)
    if as_json:
        _print_json(result)
        return
    out.print(f"{result['alias']}: {result['previous']} -> {result['version']} ({result['path']}; {result['ollama']})")


@command
def chat(target: str = typer.Argument(..., help="NAME:N, NAME (its newest ready version) or NAME@ALIAS."),
         system: Optional[str] = typer.Option(None, "--system", help="The system prompt; default: the Modelfile's "
                                                                    "SYSTEM, else none."),
         backend: str = typer.Option("auto", "--backend", help="gguf (the export, as Ollama serves it), hf "
                                                              "(transformers) or auto: gguf when there is an export "
                                                              "that passed its checks."),
         temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0,
                                                     help="0 for greedy; default: the Modelfile's, else Ollama's 0.8."),
         seed: int = typer.Option(0, "--seed"),
         max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Most tokens per answer.")) -> None:
    """Talk with a version: answers stream as they are generated, each followed by its tokens/s. Lines starting
    /reset, /system TEXT and /quit control the conversation; end of input ends it."""
    import sys

    from flows.chat import Settings, converse, resolve

    if backend not in ("auto", "gguf", "hf"):
        raise TuneryError(f"--backend must be auto, gguf or hf, got {backend!r}")
    found = resolve(target, backend)
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        try:
            return input("you> " if interactive else "")
        except EOFError:
            return None

    converse(found, Settings(system=system, temperature=temperature, seed=seed, max_tokens=max_tokens), read,
             STDOUT)


@command
def dashboard(host: str = typer.Option("127.0.0.1", help="Address to listen on; the default keeps it on this "
                                                         "machine. Use 0.0.0.0 only on a network you trust."),
              port: int = typer.Option(8501, help="Port to listen on.")) -> None:
    """Serve the Streamlit dashboard: versions, comparisons, quality vs speed, lineage, promote and roll back."""
    import registry

    app = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
    err.print(f"tunery dashboard on http://{host}:{port} (registry {registry.db.describe()})")
    sys.stderr.flush()
    # This process becomes the Streamlit server (no child): SIGTERM or Ctrl-C stop the server itself, and nothing
    # is left holding the port.
    os.execv(sys.executable, [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer"])


@command
def serve(prefect_yaml: Path = typer.Option(None, "--prefect-file", help="Default: deployments/prefect.yaml.")) -> None:
    """Serve the scheduled retraining deployments on this machine (runs start at each cron tick)."""
    from flows import serve as serving

    _prefect_env()
    serving.serve(prefect_yaml or serving.PREFECT_YAML)




@command
def setup() -> None:
    """Prepare the default base model (download and convert once); safe to re-run."""
    from tasks.models import ensure_default_base_model

    out.print(f"default base model: {ensure_default_base_model()}")
