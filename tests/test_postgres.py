"""What only the PostgreSQL spool has: its settings and password, its optional driver, schema
migration by several daemons at once, a database that goes away and comes back, and several
daemons on one database (a dead one's claims, one idempotency key)."""

import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from dispatcher import wire
from dispatcher.client import Client
from dispatcher.errors import SettingsError, SpoolError, StartupError, StoreUnavailable
from dispatcher.observer import Observer
from dispatcher.settings import SpoolSettings, load_settings
from dispatcher.spool import Finish, Incoming, Start, open_reader, open_spool
from dispatcher.spool import postgres_schema as schema
from tests.daemon import InProcessDaemon, run_cli, write_settings
from tests.postgres import PASSWORD, PostgresServer, query, require_binaries
from tests.smtp_server import SmtpServer
from tests.test_spool import rendered

ADA = {"name": "Ada", "activate_url": "https://example.com/a"}


def request(request_id: str, **fields: object) -> Incoming:
    checked = wire.validate(
        {"v": 1, "id": request_id, "template": "welcome", "to": "a@example.com", **fields}
    )
    return Incoming.of(checked)


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may stop and start."""
    require_binaries()
    with tempfile.TemporaryDirectory(prefix="pg") as folder:
        server = PostgresServer(Path(folder))
        try:
            yield server
        finally:
            server.stop()


# -- settings and driver -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://app:s3cret@db.internal/mail", "holds a password"),
        ("postgresql://app@db.internal/mail?password=s3cret", "holds a password"),
        ("mysql://app@db.internal/mail", "expected a postgresql:// URL"),
    ],
)
def test_a_url_with_a_password_or_of_another_database_is_refused(url: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint) as caught:
        load_settings(overrides={"spool__url": url}, environ={})
    assert "s3cret" not in str(caught.value)


def test_without_psycopg_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what `import psycopg` finds uninstalled
    monkeypatch.delitem(sys.modules, "dispatcher.spool.postgres", raising=False)
    settings = SpoolSettings(url="postgresql://app@db.internal/mail")
    with pytest.raises(SettingsError, match=r"pip install 'dispatcher\[postgres\]'"):
        open_spool(settings, "a")
    with pytest.raises(SettingsError, match="psycopg"):
        open_reader(settings)


def test_the_password_comes_from_password_file_or_pgpassword(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    database = postgres_url.split("/")[3].split("?")[0]
    tcp = SpoolSettings(url=postgres_server.tcp_url(database))  # TCP asks for a password
    with pytest.raises(StartupError, match="password") as caught:
        open_spool(tcp, "a")
    assert PASSWORD not in str(caught.value)
    (tmp_path / "db-password").write_text(PASSWORD + "\n")
    with open_spool(replace(tcp, password_file=tmp_path / "db-password"), "a") as spool:
        assert spool.add([request("r1")], [], 1.0) == ["r1"]
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with open_reader(tcp) as reader:
        assert reader.counts()["queued"] == 1


# -- schema ------------------------------------------------------------------------------


def test_daemons_starting_together_create_the_schema_once(postgres_url: str) -> None:
    settings = SpoolSettings(url=postgres_url)
    errors: list[BaseException] = []

    def start(owner: str) -> None:
        try:
            open_spool(settings, owner).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(f"d{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with open_reader(settings) as reader:
        assert query(reader, "select version from schema_version") == [(schema.VERSION,)]


def test_a_schema_of_a_newer_release_is_refused_not_changed(postgres_url: str) -> None:
    settings = SpoolSettings(url=postgres_url)
    with open_spool(settings, "a") as spool, spool.transaction() as cursor:
        cursor.execute("update schema_version set version = %s", (schema.VERSION + 1,))
    with pytest.raises(StartupError, match="newer dispatcher"):
        open_spool(settings, "a")
    with pytest.raises(SpoolError, match="newer dispatcher"):
        open_reader(settings)


def test_a_report_on_a_database_no_daemon_used_says_so(postgres_url: str, tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="no spool in"):
        open_reader(SpoolSettings(url=postgres_url))
    settings = write_settings(tmp_path, smtp_port=1, spool={"url": postgres_url})
    result = run_cli("status", settings=settings)
    assert result.returncode == 2, result.stderr
    assert "no spool in postgresql://" in result.stderr and "Traceback" not in result.stderr


# -- the database going away -------------------------------------------------------------


def test_a_database_that_stops_raises_store_unavailable_then_serves_again(
    own_server: PostgresServer,
) -> None:
    settings = SpoolSettings(url=own_server.create_database("spool"))
    with open_spool(settings, "a") as spool:
        spool.add([request("before")], [], 1.0)
        (claimed,) = spool.claim(2.0, 10)
        own_server.stop()
        with pytest.raises(StoreUnavailable, match=r"spool\.url postgresql://"):
            spool.add([request("during")], [], 3.0)
        with pytest.raises(StoreUnavailable):
            spool.record([Start(rendered(claimed), 1, 3.0)], [])
        with pytest.raises(StoreUnavailable):  # still down: a new connection fails the same way
            spool.claim(3.0, 10)
        with pytest.raises(SpoolError):
            open_reader(settings)
        # The systemd status line (fed with the watchdog) says so instead of failing.
        status = Observer(load_settings(environ={}), spool).status()
        assert status.startswith("? waiting; since start")
        own_server.start()
        # The same spool object connects again; nothing of the failed writes was kept.
        assert spool.add([request("during")], [], 4.0) == ["during"]
        assert spool.inspect("before")["state"] == "queued"  # type: ignore[index]
        assert spool.counts()["queued"] == 2


def test_a_server_that_turned_read_only_is_unavailable_until_a_primary_answers(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """As after a failover, when the address still leads to the old primary, now a standby."""
    name = postgres_url.split("/")[3].split("?")[0]
    with open_spool(SpoolSettings(url=postgres_url), "a") as spool:
        postgres_server.admin(f'alter database "{name}" set default_transaction_read_only = on')
        postgres_server.admin(
            f"select pg_terminate_backend(pid) from pg_stat_activity where datname = '{name}'"
        )
        with pytest.raises(StoreUnavailable):  # the connection that was cut
            spool.add([request("r1")], [], 1.0)
        with pytest.raises(StoreUnavailable, match=r"read-only|read only"):
            spool.add([request("r1")], [], 1.0)
        postgres_server.admin(f'alter database "{name}" reset default_transaction_read_only')
        assert spool.add([request("r1")], [], 2.0) == ["r1"]


# -- several daemons on one database -----------------------------------------------------


def test_daemons_claiming_at_once_never_take_the_same_request(postgres_url: str) -> None:
    settings = SpoolSettings(url=postgres_url)
    with open_spool(settings, "loader") as spool:
        spool.add([request(f"r{i}") for i in range(1000)], [], 1.0)
    taken: dict[str, list[str]] = {}
    ready = threading.Barrier(4, timeout=60)

    def work(owner: str) -> None:
        with open_spool(settings, owner) as spool:
            mine = taken.setdefault(owner, [])
            ready.wait()  # all connected: the claims themselves race
            for _ in range(300):  # bounded: 4 x 300 claims of 4 are more than 1,000 rows
                rows = spool.claim(2.0, 4)
                if not rows:
                    return
                mine.extend(row.id for row in rows)

    threads = [threading.Thread(target=work, args=(f"d{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [request_id for ids in taken.values() for request_id in ids]
    assert sorted(every) == sorted(f"r{i}" for i in range(1000))  # each once, none left
    assert sum(1 for ids in taken.values() if ids) > 1  # they really took turns


def test_a_dead_daemons_claims_are_taken_after_its_lease_flagged_duplicate(
    postgres_url: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    store = SpoolSettings(url=postgres_url, lease=5)
    dead = open_spool(store, "dead host")  # a daemon killed mid-work: its claims stay behind
    dead.add([request(f"r{i}", context=ADA) for i in range(10)], [], 1.0)
    claimed = dead.claim(2.0, 4)
    dead.record([Start(rendered(row), 1, 3.0) for row in claimed[:2]], [])  # two sends begun
    dead.heartbeat(3.0, starting=True)
    dead.close()
    # Its claims were made with a lease ending at 2 + 5: long lapsed by the wall clock. So
    # that the survivor has to wait for the lease, renew them as if the host died just now.
    with open_spool(store, "dead host") as again:
        again.renew(time.time())
    settings = write_settings(
        tmp_path,
        smtp_server.port,
        spool={"url": postgres_url, "lease": 5},
        retry={"max_age": 1e10},  # the rows are from 1970: past the default max_age, not sent
    )
    survivor = run_daemon(settings)
    messages = smtp_server.wait_for(10, timeout=30)
    survivor.wait_for_counts(sent=10)
    assert sorted(m.rcpt_tos[0] for m in messages) == ["a@example.com"] * 10
    with open_reader(store) as reader:
        flagged = {i for i in (f"r{n}" for n in range(10)) if reader.inspect(i)["maybe_duplicate"]}  # type: ignore[index]
        assert flagged == {row.id for row in claimed[:2]}
    assert any(
        "sends of a daemon that stopped renewing go again" in line for line in survivor.lines
    )


def test_one_idempotency_key_sent_to_two_daemons_yields_one_mail(
    postgres_url: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(write_settings(tmp_path / name, smtp_server.port, spool={"url": postgres_url}))
    daemons = [run_daemon(path) for path in paths]
    for path in paths:
        with Client(load_settings(path, environ={})) as client:
            client.enqueue_email("welcome", to="a@example.com", context=ADA, idempotency_key="k1")
            assert client.flush(10)
    daemons[0].wait_for_counts(sent=1)
    assert len(smtp_server.wait_for(1)) == 1
    assert any("ignored: the spool already holds it" in line for line in daemons[1].lines)
    status = run_cli("status", "--json", settings=paths[0])
    report = orjson.loads(status.stdout)
    assert report["counts"]["sent"] == 1 and report["spool"] == postgres_url
    assert [d["alive"] for d in report["daemons"]] == [True, True]
    assert len(smtp_server.messages) == 1


def test_postgres_restarted_while_requests_flow_loses_nothing(
    own_server: PostgresServer,
    tmp_path: Path,
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    url = own_server.create_database("spool")
    settings = write_settings(tmp_path, smtp_server.port, spool={"url": url})
    daemon = run_daemon(settings)
    sent_ids: list[str] = []
    with Client(load_settings(settings, environ={})) as client:
        for i in range(300):
            sent_ids.append(client.enqueue_email("welcome", to=f"u{i}@example.com", context=ADA))
            if i == 100:
                own_server.stop()
            if i == 200:
                own_server.start()
        flushed = client.flush(60)
    assert flushed, daemon.log
    daemon.wait_for_counts(sent=300, timeout=90)
    assert daemon.alive
    assert "store available again" in daemon.log  # it waited out the outage by itself
    delivered = Counter(
        m.message_id.strip("<>").split("@")[0] for m in smtp_server.messages if m.message_id
    )
    assert set(delivered) == set(sent_ids)


def test_a_daemon_started_while_postgres_is_down_serves_once_it_is_up(
    own_server: PostgresServer,
    tmp_path: Path,
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    url = own_server.create_database("spool")  # no schema yet: the daemon makes it when up
    own_server.stop()
    settings = write_settings(tmp_path, smtp_server.port, spool={"url": url})
    daemon = run_daemon(settings)
    with Client(load_settings(settings, environ={})) as client:
        sent_ids = [
            client.enqueue_email("welcome", to=f"u{i}@example.com", context=ADA) for i in range(20)
        ]
        own_server.start()
        flushed = client.flush(60)
    assert flushed, daemon.log
    daemon.wait_for_counts(sent=20, timeout=60)
    assert daemon.alive
    assert "the schema is checked once the database answers" in daemon.log
    delivered = {
        m.message_id.strip("<>").split("@")[0] for m in smtp_server.messages if m.message_id
    }
    assert delivered == set(sent_ids)
    with open_reader(SpoolSettings(url=url)) as reader:
        assert len(reader.daemons()) == 1  # its starting heartbeat, beaten once it could


def test_the_queue_commands_work_on_a_postgresql_spool(postgres_url: str, tmp_path: Path) -> None:
    settings = write_settings(tmp_path, smtp_port=1, spool={"url": postgres_url})
    with open_spool(SpoolSettings(url=postgres_url), "host-a") as spool:
        spool.add([request("gone"), request("fine")], [], time.time())
        (gone, _fine) = spool.claim(time.time(), 2)
        spool.record([Start(rendered(gone), 1, time.time())], [])
        spool.record([], [Finish("gone", "dead", time.time(), "550 no such user", number=1)])
        spool.heartbeat(time.time(), starting=True)
    status = run_cli("status", settings=settings)
    assert status.returncode == 0, status.stderr
    assert f"spool {postgres_url}" in status.stdout and "550 no such user" in status.stdout
    assert "daemons: 1 alive" in status.stdout and "host-a" in status.stdout
    inspect = run_cli("inspect", "gone", settings=settings)
    assert inspect.returncode == 0 and "attempts (1)" in inspect.stdout
    assert "message as sent (5 bytes" in inspect.stdout
    retry = run_cli("retry", "--dead", settings=settings)
    assert (retry.returncode, retry.stdout.strip()) == (0, "re-queued 1 request")
    with open_spool(SpoolSettings(url=postgres_url), "host-a") as spool:
        spool.record([], [Finish("gone", "dead", time.time(), "550 again")])
    purge = run_cli("purge", "--dead", settings=settings)
    assert (purge.returncode, purge.stdout.strip()) == (0, "purged 1 dead request")
    missing = run_cli("inspect", "gone", settings=settings)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"dispatcher: no request 'gone' in {postgres_url}"
