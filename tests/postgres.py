"""A throwaway PostgreSQL server for the tests: the machine's own binaries (Debian's package
`postgresql`), a fresh data folder under /tmp, listening on 127.0.0.1 at a free port.

`start_server()` returns a running `PostgresServer`; its `url` is what a user gives
`trainer sweep --storage`. `.ci/run` installs the binaries when they are missing."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

INSTALL_HINT = "run `bash .ci/run` (it installs them), or `apt-get install postgresql` as root"
DEBIAN_BIN_DIRS = "/usr/lib/postgresql/*/bin"
USER = "trainer"
HOST = "127.0.0.1"

# a second process that stops the server and deletes its folder when the test process dies
# without stopping it (SIGKILL, a crashed xdist worker): the pipe's end of the test process
# closes, and no all-clear byte came first
WATCHDOG = """
import os, shutil, signal, sys, time
pipe, pid, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if not os.read(pipe, 1):
    try:
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(folder, ignore_errors=True)
"""


class PostgresUnavailable(RuntimeError):
    """The server cannot be started here; the message says why and what to do."""


def find_binaries() -> Path:
    """The folder holding `initdb` and `postgres`: the one `initdb` on PATH lives in, else the
    newest of Debian's /usr/lib/postgresql/<version>/bin (not on PATH by default)."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = sorted(Path("/").glob(DEBIAN_BIN_DIRS.lstrip("/")), key=_version_key, reverse=True)
    candidates.extend(debian)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres")):
            return folder
    looked = ", ".join(str(c) for c in candidates) or f"PATH and {DEBIAN_BIN_DIRS}"
    raise PostgresUnavailable(
        f"the PostgreSQL server binaries (initdb, postgres) are not installed (looked in {looked}): {INSTALL_HINT}"
    )


def _version_key(folder: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); a folder named otherwise sorts first
    parts = folder.parent.name.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (-1,)


def _server_account() -> pwd.struct_passwd | None:
    """Who runs the server: initdb and postgres refuse root, so as root Debian's `postgres`
    account (made by the package), else `nobody`; as anyone else, that user itself (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        f"running as root and there is no `postgres` or `nobody` account to run the server as: {INSTALL_HINT}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    """A running server; `stop()` ends it and deletes its folder."""

    folder: Path
    port: int
    password: str
    database: str
    process: subprocess.Popen
    log: IO[bytes] = field(repr=False)
    watchdog: subprocess.Popen | None = field(default=None, repr=False)
    all_clear: int | None = field(default=None, repr=False)

    def url_for(self, database: str) -> str:
        """A SQLAlchemy URL of `database` on this server (plain postgresql://, as a user types it:
        SQLAlchemy 2.1 reads it as psycopg 3)."""
        return f"postgresql://{USER}:{self.password}@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The URL of the database made at start."""
        return self.url_for(self.database)

    def create_database(self, name: str) -> str:
        """Make an empty database `name` and return its URL (for a test that needs its own)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=10) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def log_text(self) -> str:
        """What the server wrote to its log so far."""
        path = self.folder / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then delete the folder."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            self.log.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            if self.watchdog is not None:
                os.write(self.all_clear, b".")
                os.close(self.all_clear)
                self.watchdog.wait(timeout=30)
                self.watchdog = None

    def watch(self) -> None:
        """Start the watchdog (WATCHDOG above) of this server."""
        read_end, self.all_clear = os.pipe()
        self.watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", WATCHDOG, str(read_end), str(self.process.pid), str(self.folder)],
            pass_fds=(read_end,), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(read_end)


def start_server(database: str = "trainer", timeout: float = 60) -> PostgresServer:
    """Make a data folder, start a server in it on 127.0.0.1 at a free port, make `database`.

    Raises PostgresUnavailable when the binaries are missing, RuntimeError (with the server's
    log) when the server does not start."""
    binaries = find_binaries()
    account = _server_account()
    # as root under /tmp itself: the server's account must reach its folder (pytest's are 0700 root's)
    folder = Path(tempfile.mkdtemp(prefix="trainer-pg-", dir="/tmp" if account else None))
    try:
        return _start_in(folder, binaries, account, database, timeout)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _start_in(folder: Path, binaries: Path, account: pwd.struct_passwd | None, database: str, timeout: float) -> PostgresServer:
    as_account = {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    # PG* variables of the caller (PGPORT, PGDATA...) must not steer the throwaway server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
    password = secrets.token_hex(16)
    password_file = folder / "password"
    password_file.write_text(password + "\n")
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
        os.chown(password_file, account.pw_uid, account.pw_gid)
    data = folder / "data"
    initdb = subprocess.run(
        [binaries / "initdb", "-D", data, "-U", USER, f"--pwfile={password_file}", "--auth=scram-sha-256",
         "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=timeout, check=False, **as_account,
    )  # fmt: skip
    password_file.unlink()
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb failed (exit {initdb.returncode}) in {data}:\n{initdb.stdout}{initdb.stderr}")

    log = open(folder / "postgres.log", "ab")  # noqa: SIM115 (open while the server runs; stop() closes it)
    # a free port can be taken by another process before the server binds it: try a few
    for _ in range(5):
        port = _free_port()
        log_start = log.tell()
        process = subprocess.Popen(
            [binaries / "postgres", "-D", data, "-p", str(port), "-c", f"listen_addresses={HOST}",
             "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off"],
            cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **as_account,
        )  # fmt: skip
        server = PostgresServer(folder, port, password, database, process, log)
        if _wait_ready(server, timeout):
            break
        said = server.log_text()  # read before stop() deletes the folder
        if b"could not bind" not in (folder / "postgres.log").read_bytes()[log_start:]:
            server.stop()
            how = f"did not start within {timeout:.0f} s" if process.returncode == -signal.SIGKILL else "exited at start"
            raise RuntimeError(f"the PostgreSQL server {how}; its log:\n{said}")
    else:
        server.stop()
        raise RuntimeError(f"the PostgreSQL server found no free port in 5 tries; its log:\n{said}")
    try:
        server.watch()
        server.create_database(database)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: PostgresServer, timeout: float) -> bool:
    """True once the server accepts connections (postmaster.pid's status line says `ready`);
    False when it exited (the log says why)."""
    pid_file = server.folder / "data" / "postmaster.pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return True
        time.sleep(0.02)
    server.process.kill()
    server.process.wait()
    return False
