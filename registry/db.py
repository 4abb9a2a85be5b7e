"""Opening the registry: DuckDB in TUNERY_HOME (the embedded default), or PostgreSQL when TUNERY_REGISTRY_URL
names one (`postgresql://USER@HOST:PORT/DB`), for many processes on many machines.

Callers write `with connect() as con:` for one operation. It is one transaction: it commits when the block ends and
rolls back on any error, so a failed write leaves no partial rows. `con.execute(sql, params)` takes SQL in DuckDB's
dialect with `?` placeholders and bound values; registry.dialect rewrites it for PostgreSQL. The numbered
migrations in registry/migrations run on both.

Each process keeps one connection per registry and reuses it across operations (one operation at a time; threads
take turns):
- PostgreSQL: a psycopg connection, migrated once per process (an advisory lock lets one process migrate at a
  time). Many processes write at once; numbers per name are claimed under one row lock, so they stay consecutive.
- DuckDB lets one process open the file at a time, and opening costs about 15 ms of CPU (each database instance
  builds its function catalogue). Processes take turns through lock files beside the registry: a process keeps the
  file open while it works, and LINGER_S after, unless another process is waiting and it has held the file HOLD_S.
  A waiting reader (the dashboard, the CLI) goes before waiting writers, so reads do not starve.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import re
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from core.errors import RegistryBusy, TuneryError
from core.home import registry_path
from registry.schema import Connection, apply_migration, pending_migrations, migrate

LOCK_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0)  # DuckDB's own lock, held by a process outside
LINGER_S = 0.05    # DuckDB: keep the file open this long after an operation, for the process's next one
HOLD_S = 0.15      # DuckDB: hand the file over at the end of an operation once held this long and someone waits
HANDOVER_S = 0.01  # DuckDB: after handing the file over, wait this long before asking for it again
WAIT_S = 120.0     # DuckDB: give up (RegistryBusy) after waiting this long for a turn
MIGRATION_LOCK = 7_245_021  # PostgreSQL advisory lock id: one process migrates at a time


def registry_url() -> str | None:
    """TUNERY_REGISTRY_URL when set (a PostgreSQL registry), else None (DuckDB in TUNERY_HOME)."""
    url = os.environ.get("TUNERY_REGISTRY_URL", "").strip()
    if not url:
        return None
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise TuneryError(f"TUNERY_REGISTRY_URL must be a postgresql:// URL, got {redact(url)!r}")
    return url


def backend_name() -> str:
    return "postgresql" if registry_url() else "duckdb"


def redact(url: str) -> str:
    """A URL without its password (in the user part or a `password=` parameter), for messages and the dashboard."""
    parts = urlsplit(url)
    masked = parts._replace(query=re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", parts.query))
    if parts.password is not None:
        masked = masked._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return url if masked == parts else urlunsplit(masked)


def describe() -> str:
    """Where the registry is, for people: the DuckDB file or the PostgreSQL URL (password hidden)."""
    url = registry_url()
    return redact(url) if url else str(registry_path())


def exists() -> bool:
    """Whether a registry is there to read (PostgreSQL: always; the database is the user's)."""
    return bool(registry_url()) or registry_path().exists()


# ---------------------------------------------------------------- DuckDB


def _is_lock_error(e: Exception) -> bool:
    text = str(e).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


def _open(path: Path):
    """Open the DuckDB file, waiting with backoff while a process outside the turn-taking (an older tunery, a
    user's own duckdb session) holds its lock."""
    import duckdb

    for delay in (*LOCK_RETRIES, None):
        try:
            return duckdb.connect(str(path))
        except duckdb.IOException as e:
            if not _is_lock_error(e):
                raise
            if delay is None:
                raise RegistryBusy(f"{path}: the registry is locked by another process; try again") from None
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class _DuckDB:
    """This process's turn at one DuckDB file (see the module's docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()
        self.con: Any = None
        self.fds: dict[str, int] = {}
        self.depth = 0
        self.held_since = self.last_used = self.handed_over = 0.0
        self.watching = False

    def _fd(self, kind: str) -> int:
        # turn: held (exclusively) by the process whose turn it is; writers / readers: held shared by the processes
        # waiting; probe: this process's own handle for asking whether anyone waits.
        if kind not in self.fds:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            suffix = {"turn": "lock", "writers": "writers", "readers": "readers", "probe-writers": "writers",
                      "probe-readers": "readers"}[kind]
            self.fds[kind] = os.open(f"{self.path}.{suffix}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        return self.fds[kind]

    def _waiting(self, who: str) -> bool:
        fd = self._fd(f"probe-{who}")
        if _try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True

    def _take_turn(self, reader: bool) -> None:
        # A process that just handed the file over lets a waiting one take it before trying again.
        pause = self.handed_over + HANDOVER_S - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        turn = self._fd("turn")
        if (reader or not self._waiting("readers")) and _try_lock(turn):
            return
        flag = self._fd("readers" if reader else "writers")
        fcntl.flock(flag, fcntl.LOCK_SH)  # announce: the holder hands over
        try:
            deadline, delay = time.monotonic() + WAIT_S, 0.0005
            while True:
                if (reader or not self._waiting("readers")) and _try_lock(turn):
                    return
                if time.monotonic() > deadline:
                    raise RegistryBusy(f"{self.path}: waited {WAIT_S:.0f} s for the registry; another process "
                                       "keeps it busy")
                time.sleep(delay)
                delay = min(delay * 2, 0.002 if reader else 0.004)
        finally:
            fcntl.flock(flag, fcntl.LOCK_UN)

    def _close(self, handover: bool = False) -> None:
        if self.con is not None:
            con, self.con = self.con, None
            try:
                con.close()
            finally:
                fcntl.flock(self._fd("turn"), fcntl.LOCK_UN)
                if handover:
                    self.handed_over = time.monotonic()

    def _someone_waits(self) -> bool:
        return self._waiting("readers") or self._waiting("writers")

    @contextmanager
    def lease(self, reader: bool) -> Iterator[Connection]:
        with self.lock:
            if self.depth:  # an operation inside an operation joins it
                yield Connection(self.con, "duckdb")
                return
            if self.con is None:
                self._take_turn(reader)
                try:
                    self.con = _open(self.path)
                    key = (str(self.path), os.stat(self.path).st_ino)
                    if key not in _MIGRATED:
                        migrate(self.con)
                        _MIGRATED.add(key)
                except BaseException:
                    if self.con is not None:
                        self._close()
                    else:
                        fcntl.flock(self._fd("turn"), fcntl.LOCK_UN)
                    raise
                self.held_since = time.monotonic()
            self.depth = 1
            try:
                self.con.execute("BEGIN TRANSACTION")
                try:
                    yield Connection(self.con, "duckdb")
                except BaseException:
                    self.con.execute("ROLLBACK")
                    raise
                self.con.execute("COMMIT")
            finally:
                self.depth = 0
                self.last_used = time.monotonic()
                if self.last_used - self.held_since >= HOLD_S and self._someone_waits():
                    self._close(handover=True)
                else:
                    self._watch()

    def _watch(self) -> None:
        """While the file lingers open, hand it over as soon as someone waits, and close it after LINGER_S (called
        with self.lock held)."""
        if not self.watching:
            self.watching = True
            threading.Thread(target=self._linger, name="tunery-registry-linger", daemon=True).start()

    def _linger(self) -> None:
        while True:
            time.sleep(0.002)
            with self.lock:
                if self.con is None:
                    self.watching = False
                    return
                if self.depth:
                    continue
                now = time.monotonic()
                idle = now - self.last_used
                # someone waits: hand over once held HOLD_S, or once this process paused between operations
                if idle >= LINGER_S or ((now - self.held_since >= HOLD_S or idle >= 0.005)
                                        and self._someone_waits()):
                    self._close(handover=idle < LINGER_S)
                    self.watching = False
                    return

    def release(self) -> None:
        with self.lock:
            self._close()


# ---------------------------------------------------------------- PostgreSQL


class _Postgres:
    """This process's connection to a PostgreSQL registry."""

    def __init__(self, url: str):
        self.url = url
        self.lock = threading.RLock()
        self.con: Any = None
        self.depth = 0

    def _connection(self):
        import psycopg

        if self.con is not None and not self.con.closed and not self.con.broken:
            return self.con
        self.con = None
        try:
            # keepalives: a connection idle through hours of training is kept, or found dead, by TCP itself
            con = psycopg.connect(self.url, autocommit=True, connect_timeout=10, keepalives=1,
                                  keepalives_idle=60, keepalives_interval=10, keepalives_count=3)
        except psycopg.Error as e:
            raise TuneryError(f"cannot reach the registry at {redact(self.url)}: {str(e).strip()}") from None
        try:
            if self.url not in _MIGRATED:
                self._migrate(Connection(con, "postgresql"))
                _MIGRATED.add(self.url)
        except BaseException:
            con.close()
            raise
        self.con = con  # only a migrated connection is kept
        return con

    @staticmethod
    def _migrate(con: Connection) -> None:
        """All pending migrations in one transaction, one process at a time (an advisory lock); nothing to lock
        when every migration is there already."""
        with con.raw.transaction():
            if con.execute("SELECT to_regclass('_migrations') IS NOT NULL").fetchone()[0] and not pending_migrations(con):
                return
            con.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATION_LOCK])
            for migration in pending_migrations(con):
                apply_migration(con, migration)

    @contextmanager
    def lease(self, reader: bool) -> Iterator[Connection]:
        import psycopg

        with self.lock:
            if self.depth:
                yield Connection(self.con, "postgresql")
                return
            with ExitStack() as stack:
                for attempt in (1, 2):  # a connection the server dropped meanwhile is replaced once
                    con = self._connection()
                    try:
                        stack.enter_context(con.transaction())
                        break
                    except psycopg.OperationalError as e:
                        self.con = None
                        if attempt == 2:
                            raise TuneryError(f"lost the registry at {redact(self.url)}: {str(e).strip()}") from None
                self.depth = 1
                try:
                    yield Connection(con, "postgresql")
                finally:
                    self.depth = 0

    def release(self) -> None:
        with self.lock:
            if self.con is not None:
                self.con.close()
                self.con = None


# ---------------------------------------------------------------- one handle per registry per process

_HANDLES: dict[str, Any] = {}
_HANDLES_LOCK = threading.Lock()
_MIGRATED: set = set()
_ORPHANS: list = []  # a forked child's copies of its parent's connections: kept, never closed (closing would end
                     # the parent's PostgreSQL session)


def parse_target(url: str) -> tuple[str, str]:
    """A registry named by URL: ('postgresql', URL) for postgresql://..., ('duckdb', PATH) for duckdb:///PATH or a
    path ending in .duckdb."""
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        return "postgresql", url
    path = url[len("duckdb://"):] if url.startswith("duckdb://") else url
    if url.startswith("duckdb://") or path.endswith(".duckdb"):
        return "duckdb", str(Path(path).expanduser().absolute())
    raise TuneryError(f"{redact(url)!r}: expected postgresql://USER@HOST:PORT/DB or duckdb:///PATH/registry.duckdb")


def current() -> tuple[str, str]:
    """This process's registry as parse_target names one: ('postgresql', URL) or ('duckdb', PATH)."""
    url = registry_url()
    return ("postgresql", url) if url else ("duckdb", str(registry_path()))


def _handle(target: str | None = None):
    kind, key = current() if target is None else parse_target(target)
    with _HANDLES_LOCK:
        if key not in _HANDLES:
            _HANDLES[key] = _Postgres(key) if kind == "postgresql" else _DuckDB(Path(key))
        return _HANDLES[key]


@contextmanager
def connect(read_only: bool = False, target: str | None = None) -> Iterator[Connection]:
    """A transaction on the registry for one operation (see the module's docstring). `read_only` marks a reader,
    which goes before waiting writers on DuckDB. `target` names another registry than this process's (see
    parse_target)."""
    with _handle(target).lease(read_only) as con:
        yield con


def release() -> None:
    """Close this process's registry connections now (DuckDB: end its turn at the file)."""
    with _HANDLES_LOCK:
        handles = list(_HANDLES.values())
    for h in handles:
        h.release()


def _forget_in_child() -> None:
    global _HANDLES_LOCK
    for handle in _HANDLES.values():  # the parent's turn is the parent's: a child that outlives it must not hold it
        for fd in getattr(handle, "fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
    _ORPHANS.extend(_HANDLES.values())
    _HANDLES.clear()
    _HANDLES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(release)


