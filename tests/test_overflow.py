"""The overflow folder: under CURVE only spill files sealed by an allowed key are sent, the rest
are kept aside; a client's flush() is False whenever a request is neither acknowledged nor kept
on disk, and a folder that cannot be written is refused at boot."""

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import yaml
import zmq
import zmq.auth

import dispatcher
from dispatcher import Client, client, handoff, overflow, wire
from dispatcher.curve import keygen, spill_seal
from dispatcher.errors import SettingsError
from dispatcher.settings import Settings, load_settings
from tests.daemon import InProcessDaemon, run_cli, write_settings
from tests.disks import SmallDisk, fill
from tests.smtp_server import SmtpServer
from tests.test_curve import CONTEXT, curve_daemon_settings

RunDaemon = Callable[..., InProcessDaemon]
OPTIONS: wire.EmailOptions = {"to": "a@example.com", "context": CONTEXT}


def client_settings(settings_path: Path, **client: object) -> Settings:
    """The client side of a settings file, with `client` keys replaced (`curve__secret_key_file`
    gives the client another key)."""
    overrides = {f"client__{key}": value for key, value in client.items()}
    return load_settings(settings_path, {"client__ack_timeout": 0.3, **overrides}, environ={})


def spilled_ids(folder: Path) -> list[str]:
    return [orjson.loads(f)["id"] for p in overflow.waiting(folder) for f in overflow.read(p) or []]


def wait_until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done within {timeout} s"
        time.sleep(0.02)


def spill_one(settings: Settings, request_id: str, to: str = "a@example.com") -> Path:
    """A spill file as a client with `settings` writes it (sealed under `client.curve`)."""
    frame = wire.encode(wire.request_fields("welcome", {**OPTIONS, "to": to}, id=request_id))
    path = overflow.spill(settings.client.overflow_dir, [frame], "t", spill_seal(settings.client))
    assert path is not None
    os.utime(path, (0, 0))  # older than any client's lease on it
    return path


# -- under CURVE, the folder admits no one the sockets refuse ------------------------------------


def test_a_refused_clients_spill_is_kept_and_never_sent(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    settings, k, _ = curve_daemon_settings(tmp_path, smtp_server.port)
    daemon = run_daemon(settings)
    stranger = Client(client_settings(settings, curve__secret_key_file=str(k["stranger"])))
    with stranger:
        request_id = stranger.enqueue_email("welcome", to="stranger@example.com", context=CONTEXT)
        assert stranger.flush(5.0) is False  # refused at the handshake, so spilled
    daemon.wait_for_log("its key is not in intake.curve.authorized_keys_dir")
    with Client(daemon.settings) as app:  # an allowed client shares the folder: sends its own
        app.enqueue_email("welcome", to="app@example.com", context=CONTEXT)
        assert app.flush(10.0)
    (message,) = smtp_server.wait_for(1)
    assert daemon.stop() == 0
    assert message.rcpt_tos == ("app@example.com",) and len(smtp_server.messages) == 1
    assert sum(daemon.counts().values()) == 1
    refused = tmp_path / "overflow" / "refused"
    assert spilled_ids(refused) == [request_id] and spilled_ids(tmp_path / "overflow") == []
    assert daemon.log.count("refused overflow file") == 1
    assert "overflow_refused 1" in daemon.log.splitlines()[-1]  # the shutdown line counts it
    report = orjson.loads(run_cli("status", "--json", settings=settings).stdout)
    assert report["overflow_refused"] == 1


@pytest.mark.parametrize("change", ["none", "altered", "seal removed"])
def test_only_an_allowed_clients_unaltered_spill_is_sent(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon, change: str
) -> None:
    settings, _, _ = curve_daemon_settings(tmp_path, smtp_server.port)
    with Client(client_settings(settings)) as app:  # no daemon yet: it spills
        request_id = app.enqueue_email("welcome", to="app@example.com", context=CONTEXT)
        assert app.flush(1.0) is False
    (path,) = overflow.waiting(tmp_path / "overflow")
    data = path.read_bytes()
    assert data.startswith(
        b"#hmac-sha256 " + zmq.auth.load_certificate(tmp_path / "keys/app.key")[0]
    )
    if change == "altered":
        path.write_bytes(data.replace(b"app@example.com", b"eve@example.com"))
    elif change == "seal removed":
        path.write_bytes(data.partition(b"\n")[2])
    daemon = run_daemon(settings)
    if change == "none":
        (message,) = smtp_server.wait_for(1)
        assert message.rcpt_tos == ("app@example.com",)
        daemon.wait_for_log(f"ingested 1 requests from overflow file {path.name}")
        assert not path.exists()
        return
    reason = "its MAC does not match" if change == "altered" else "not sealed"
    daemon.wait_for_log(f"refused overflow file {path.name} (key ")
    assert reason in daemon.log
    assert daemon.stop() == 0
    assert smtp_server.messages == [] and sum(daemon.counts().values()) == 0
    assert spilled_ids(path.parent / "refused") == [request_id]


def test_a_key_removed_by_reload_stops_its_files(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    settings, k, _ = curve_daemon_settings(tmp_path, smtp_server.port)
    daemon = run_daemon(settings)
    app = client_settings(settings)
    spill_one(app, "before")
    smtp_server.wait_for(1)
    (k["clients"] / "app.key").unlink()
    daemon.reload()
    daemon.wait_for_log("0 keys allowed; removed: app.key")
    path = spill_one(app, "after")
    daemon.wait_for_log(f"refused overflow file {path.name} (key ")
    assert daemon.stop() == 0
    assert len(smtp_server.messages) == 1 and daemon.counts()["sent"] == 1
    assert spilled_ids(path.parent / "refused") == ["after"]


def test_an_allowed_client_hands_over_only_its_own_keys_files(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    """As with a daemon on another host: the daemon never sees the clients' folder."""
    settings, k, _ = curve_daemon_settings(tmp_path, smtp_server.port)
    data = yaml.safe_load(settings.read_text())
    data["client"]["overflow_dir"] = "daemon-overflow"
    settings.write_text(yaml.safe_dump(data))
    folder = tmp_path / "overflow"
    app = client_settings(settings, overflow_dir=str(folder))
    stranger = client_settings(
        settings, overflow_dir=str(folder), curve__secret_key_file=str(k["stranger"])
    )
    unsealed = client_settings(settings, overflow_dir=str(folder), curve=None)
    # Oldest first, as a client scans them: the others' files come before its own.
    others = [spill_one(stranger, "stranger"), spill_one(unsealed, "unsealed")]
    forged = spill_one(app, "forged", to="app@example.com")
    forged.write_bytes(forged.read_bytes().replace(b"app@example.com", b"eve@example.com"))
    own = spill_one(app, "own")
    daemon = run_daemon(settings)
    with Client(app) as running:
        new = running.enqueue_email("welcome", to="new@example.com", context=CONTEXT)
        assert running.flush(10.0)
        received = smtp_server.wait_for(2)
        wait_until(lambda: not own.exists())  # handed over, acknowledged, removed
    assert {m.message_id.strip("<>").split("@")[0] for m in received if m.message_id} == {
        "own",
        new,
    }
    assert daemon.stop() == 0
    assert len(smtp_server.messages) == 2 and sum(daemon.counts().values()) == 2
    assert sorted(spilled_ids(folder)) == ["forged", "stranger", "unsealed"]
    assert all(path.exists() for path in [*others, forged])


def test_without_curve_sealed_and_plain_spill_files_are_both_sent(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    keygen("server", tmp_path / "keys")
    keygen("app", tmp_path / "keys")
    settings = write_settings(tmp_path, smtp_server.port)
    plain = client_settings(settings)
    sealed = client_settings(
        settings,
        curve__server_public_key_file=str(tmp_path / "keys/server.key"),
        curve__secret_key_file=str(tmp_path / "keys/app.key_secret"),
    )
    spill_one(plain, "plain")
    spill_one(sealed, "sealed")
    run_daemon(settings).wait_for_counts(sent=2)
    assert len(smtp_server.messages) == 2 and not (tmp_path / "overflow/refused").exists()


# -- flush() tells the truth; a folder that cannot be written is refused at boot --------------


@pytest.mark.parametrize("where", ["under a regular file", "in /proc"])
def test_an_overflow_dir_that_cannot_be_created_is_refused_at_boot(
    tmp_path: Path, where: str, fresh_client: None
) -> None:
    """Valid as root too: neither path can be created whatever the permissions."""
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file/overflow" if where == "under a regular file" else Path("/proc/nope")
    with pytest.raises(SettingsError, match=r"^client\.overflow_dir: cannot create or write "):
        dispatcher.configure(None, client={"overflow_dir": str(folder)})
    with pytest.raises(SettingsError, match=r"^client\.overflow_dir: "):
        Client(load_settings(None, {"client__overflow_dir": str(folder)}, environ={}))
    settings = write_settings(tmp_path, 1025, client={"overflow_dir": str(folder)})
    result = run_cli("send", "welcome", "--to", "a@example.com", settings=settings)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "client.overflow_dir: cannot create or write" in result.stderr


def test_flush_is_false_while_the_overflow_dir_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fresh_client: None
) -> None:
    settings = write_settings(tmp_path, 1025, client={"ack_timeout": 0.1})  # no daemon
    dispatcher.configure(settings)
    assert dispatcher.flush(0.0) is True  # the client, checked and started: nothing to flush
    folder = tmp_path / "overflow"
    folder.rmdir()  # then the folder goes
    folder.write_text("a file where the folder was")
    request_id = dispatcher.enqueue_email("welcome", **OPTIONS)
    assert dispatcher.flush(0.5) is False
    assert dispatcher.flush(0.5) is False  # still not written anywhere, and tried again
    assert caplog.text.count("cannot write 1 requests to client.overflow_dir") == 1
    folder.unlink()
    assert dispatcher.flush(0.5) is False  # False still, the documented way: it is spilled
    assert spilled_ids(folder) == [request_id]
    assert "client.overflow_dir" in caplog.text and "can be written again" in caplog.text
    client.close()
    assert "lost at exit" not in caplog.text


def test_a_full_overflow_disk_keeps_requests_in_memory_until_a_daemon_takes_them(
    tmp_path: Path,
    small_disk: SmallDisk,
    smtp_server: SmtpServer,
    run_daemon: RunDaemon,
    caplog: pytest.LogCaptureFixture,
    fresh_client: None,
) -> None:
    caplog.set_level(logging.WARNING, "dispatcher")
    disk = small_disk(64 * 1024)
    folder = disk / "overflow"
    settings = write_settings(tmp_path, smtp_server.port, client={"ack_timeout": 0.1})
    dispatcher.configure(settings, client={"overflow_dir": str(folder)})
    fill(disk)
    ids = [dispatcher.enqueue_email("welcome", **OPTIONS) for _ in range(3)]
    assert dispatcher.flush(0.5) is False
    assert dispatcher.flush(0.5) is False
    assert "No space left on device" in caplog.text
    assert caplog.text.count("cannot write") == 1  # once, however often it was tried
    assert list(folder.iterdir()) == []  # no half-written file eats what space comes back
    daemon = run_daemon(settings)  # the requests waited in memory, and now go to it
    assert dispatcher.flush(10.0) is True
    daemon.wait_for_counts(sent=3)
    assert sorted(m.message_id.strip("<>").split("@")[0] for m in smtp_server.messages) == sorted(
        ids
    )


def test_send_exits_1_when_the_request_can_be_kept_nowhere(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    disk = small_disk(64 * 1024)
    folder = disk / "overflow"
    folder.mkdir()
    fill(disk)
    section = {"overflow_dir": str(folder), "ack_timeout": 0.1, "exit_wait": 0.1}
    settings = write_settings(tmp_path, 1025, client=section)  # no daemon
    result = run_cli("send", "welcome", "--to", "a@example.com", settings=settings)
    assert result.returncode == 1, result.stderr
    assert "No space left on device" in result.stderr
    assert f"could not be kept in {folder}" in result.stderr
    assert "1 requests lost at exit" in result.stderr


# -- a daemon that takes frames and never acknowledges them ------------------------------------


def test_a_spill_file_handed_over_in_vain_waits_longer_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that cannot store (its disk full, its database down) reads frames and sends no
    receipt. The client must not hand it the same spill file every lease, forever: each try
    waits twice as long as the one before (here 1 s, 2 s, 4 s: at most 4 tries in 6.5 s,
    where a try every lease made 7), and the file stays until a receipt comes."""
    monkeypatch.setattr(handoff, "OVERFLOW_LEASE", 0.5)
    settings = client_settings(write_settings(tmp_path, 1025), ack_timeout=0.2)
    context = zmq.Context.instance()
    mute = context.socket(zmq.PULL)  # the daemon's intake, which never acknowledges
    mute.bind(settings.client.connect[0])
    receipts = context.socket(zmq.PUB)
    receipts.bind(settings.client.acks[0])
    path = spill_one(settings, "vain")
    tries = []
    with Client(settings) as waiting_client:
        waiting_client._start()
        deadline = time.monotonic() + 6.5
        while (left := deadline - time.monotonic()) > 0:
            if mute.poll(int(left * 1000)):
                assert orjson.loads(mute.recv())["id"] == "vain"
                tries.append(time.monotonic())
    mute.close(linger=0)
    receipts.close(linger=0)
    assert 2 <= len(tries) <= 4, f"tries at {[round(t - tries[0], 1) for t in tries]}"
    assert path.exists()  # durable until a daemon acknowledges it
