"""A throw-away PostgreSQL server for the sweep tests: `initdb` + `pg_ctl` as an unprivileged user, on a free
local port, with a password (so the tests can look for it in every file a sweep writes), removed afterwards.

Tests that need it skip only when the server's binaries are absent (`apt-get install postgresql` brings them;
`.ci/run` installs it, and there `WORKBENCH_REQUIRE_POSTGRES=1` turns the skip into a failure).
"""
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres", password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"


@pytest.fixture(scope="session")
def postgres_server():
    bindir = _bindir()
    if bindir is None:
        why = ("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: `apt-get install postgresql` "
               "(CI installs it)")
        if os.environ.get("WORKBENCH_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's own user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    password = "pw-" + secrets.token_hex(12)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if as_user:
        shutil.chown(pwfile, "postgres")
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*args):
        subprocess.run([*as_user, *map(str, args)], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(bindir / "initdb", "-D", data, "-U", "workbench", "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
            "--no-instructions")
        run(bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start a PostgreSQL server: {e.stderr or e.stdout}")
    try:
        yield PostgresServer("127.0.0.1", port, "workbench", password)
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A URL (with its password) of a new, empty database on the throw-away server; dropped afterwards."""
    import psycopg

    name = f"sweep_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(postgres_server.url(), autocommit=True)
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_server.url(name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
