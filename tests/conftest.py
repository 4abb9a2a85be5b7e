"""Fixtures: a tiny random-initialised Llama with a real (small) BPE tokenizer and ChatML template, built in
seconds without a model hub; an isolated TUNERY_HOME per test; tiny chat datasets."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Where `make setup` put the converted default base model (the tests' own TUNERY_HOME is a temp folder).
SETUP_HOME = Path(os.environ.get("TUNERY_HOME") or REPO / ".tunery")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()]
    return [m["content"] for r in rows for m in r["messages"]]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, vocab ~600) with a BPE tokenizer trained on the demo text, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny model as converted by llama.cpp's converter (once per session and file type), copied into the
    caller's folder: tests that only read an export need not run the converter again (test_export's first test
    checks the conversion itself)."""
    import shutil

    from tasks.export.convert import write_gguf

    made: dict[str, Path] = {}

    def get(outtype: str, folder: Path) -> Path:
        if outtype not in made:
            made[outtype] = write_gguf(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf") / f"tiny-{outtype}.gguf",
                                       outtype)
        target = folder / ("tiny.gguf" if outtype == "f32" else f"tiny-{outtype}.gguf")
        shutil.copy2(made[outtype], target)
        return target

    return get


@pytest.fixture(autouse=True)
def tunery_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own TUNERY_HOME, so no test touches the user's registry or another test's."""
    import registry

    home = tmp_path / "home"
    monkeypatch.setenv("TUNERY_HOME", str(home))
    monkeypatch.delenv("TUNERY_REGISTRY_URL", raising=False)
    yield home
    registry.db.release()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL server of Debian's package in a temp folder, on a free loopback port (see `postgres_server`)."""

    def __init__(self):
        import glob
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL is not installed: `make setup` installs Debian's postgresql-15")
        self.bin = Path(found[-1]).parent
        self.folder = Path(tempfile.mkdtemp(prefix="tunery-pg-"))
        # initdb refuses to run as root: run the server as the package's postgres user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "postgres")
        self.port = free_port()
        data = self.folder / "data"
        env = {k: v for k, v in os.environ.items() if k != "TUNERY_TEST_SESSION"}  # stopped by its fixture
        subprocess.run([*self.as_user, str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, env=env, cwd=self.folder)
        # fsync off: the tests' server is thrown away, and syncing each commit would measure the disk instead
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "log"),
                        "-o", options, "-w", "start"], check=True, capture_output=True, env=env, cwd=self.folder)
        self.admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh, empty database on this server; returns its URL."""
        import psycopg

        name = f"t_{os.urandom(6).hex()}"
        with psycopg.connect(self.admin, autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")  # a name made here, never user text
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast",
                        "-w", "stop"], capture_output=True, cwd=self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session; `new_database()` gives each test an empty registry's URL."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["duckdb", "postgresql"])
def backend(request, monkeypatch) -> str:
    """Runs a test on both registry backends: DuckDB in TUNERY_HOME, and PostgreSQL (TUNERY_REGISTRY_URL)."""
    if request.param == "postgresql":
        monkeypatch.setenv("TUNERY_REGISTRY_URL", request.getfixturevalue("postgres_server").new_database())
    return request.param


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(q: str, a: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


@pytest.fixture
def garden_rows() -> list[dict]:
    """The first 24 demo examples: enough for a train/validation split and a few training steps."""
    lines = (REPO / "data/demo/garden_chat.jsonl").read_text().splitlines()[:24]
    return [json.loads(line) for line in lines]


@pytest.fixture
def prepared(tmp_path, garden_rows, tiny_model_dir):
    """A prepared dataset (StageResult) of the 24 garden examples, split 20/4."""
    from tasks.data.prep import PrepConfig, prepare

    write_jsonl(tmp_path / "garden.jsonl", garden_rows)
    return prepare(PrepConfig(train=["garden.jsonl"], val_fraction=0.15), tmp_path, str(tiny_model_dir))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as converted by `make setup` (converted here if setup was skipped)."""
    from tasks.models import ensure_default_base_model

    saved = os.environ.get("TUNERY_HOME")
    os.environ["TUNERY_HOME"] = str(SETUP_HOME)
    try:
        return ensure_default_base_model()
    finally:
        if saved is None:
            os.environ.pop("TUNERY_HOME")
        else:
            os.environ["TUNERY_HOME"] = saved


@pytest.fixture(scope="module")
def prefect_server():
    """A Prefect server (Prefect's test harness: a temporary database) for one test module; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# Every process the suite starts inherits this mark, so one left behind is found even after its parent is gone.
SESSION_MARK = os.environ.setdefault("TUNERY_TEST_SESSION", f"{os.getpid()}-{os.urandom(4).hex()}")


def processes_of_this_session() -> list:
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and \
                    p.environ().get("TUNERY_TEST_SESSION") == SESSION_MARK:
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="session", autouse=True)
def leaves_no_process_behind():
    """The suite leaves no process behind: after the last test (and Prefect's temporary server, which it stops at
    exit, stopped now), no process started by the suite may still run; the leftovers are named and stopped."""
    yield
    import time

    import psutil
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
    deadline = time.time() + 20
    while (left := processes_of_this_session()) and time.time() < deadline:
        time.sleep(0.5)
    names = []
    for p in left:
        try:
            names.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.Error:
            pass
    assert not names, "processes left behind by the test suite:\n" + "\n".join(names)
