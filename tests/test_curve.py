"""Intake access: loopback or ipc by default; beyond that only CURVE clients on the allowlist."""

import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from dispatcher import Client, wire
from dispatcher.curve import check_bind_allowed, is_local, keygen, secure_client_socket
from dispatcher.errors import SettingsError
from dispatcher.settings import ClientCurveSettings, ClientSettings, ServerCurveSettings
from tests.daemon import DaemonProcess, InProcessDaemon, run_cli, write_settings
from tests.smtp_server import SmtpServer, free_port

RunDaemon = Callable[..., InProcessDaemon]
CONTEXT = {"name": "Ada", "activate_url": "https://example.com/a"}


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("ipc:///run/dispatcher/intake", True),
        ("inproc://intake", True),
        ("tcp://127.0.0.1:5559", True),
        ("tcp://127.8.9.10:5559", True),
        ("tcp://[::1]:5559", True),
        ("tcp://localhost:5559", True),
        ("tcp://0.0.0.0:5559", False),
        ("tcp://*:5559", False),
        ("tcp://[::]:5559", False),
        ("tcp://10.0.0.5:5559", False),
        ("tcp://eth0:5559", False),
        ("tcp://mail.example.com:5559", False),
    ],
)
def test_only_loopback_and_ipc_count_as_local(endpoint: str, local: bool) -> None:
    assert is_local(endpoint) is local


def test_public_bind_without_curve_is_refused_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match=r"intake\.acks: refusing to bind tcp://\*:5560"):
        check_bind_allowed("intake.acks", "tcp://*:5560", None)
    curve = ServerCurveSettings(Path("k.key_secret"), Path("clients"))
    check_bind_allowed("intake.bind", "tcp://0.0.0.0:5559", curve)  # CURVE configured: allowed


@pytest.mark.parametrize("key", ["bind", "acks"])
def test_run_on_0_0_0_0_without_keys_fails_in_one_line(tmp_path: Path, key: str) -> None:
    settings = write_settings(tmp_path, 1025, intake={key: f"tcp://0.0.0.0:{free_port()}"})
    result = run_cli("run", settings=settings)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"intake.{key}: refusing to bind tcp://0.0.0.0" in result.stderr


def test_keygen_writes_a_zeromq_certificate_pair_with_a_private_secret(tmp_path: Path) -> None:
    result = run_cli("keygen", "app", "--dir", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    public, secret = tmp_path / "keys" / "app.key", tmp_path / "keys" / "app.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public_key, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and public_key == same_public_key and secret_key
    assert zmq.curve_public(secret_key) == public_key
    again = run_cli("keygen", "app", "--dir", str(tmp_path / "keys"))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert zmq.auth.load_certificate(secret)[1] == secret_key


def keys(folder: Path) -> dict[str, Path]:
    """A server key, an authorised client key and a stranger's key, as `keygen` writes them."""
    for name in ("server", "app", "stranger"):
        keygen(name, folder)
    allowed = folder / "clients"
    allowed.mkdir()
    (allowed / "app.key").write_bytes((folder / "app.key").read_bytes())
    return {n: folder / f"{n}.key_secret" for n in ("server", "app", "stranger")} | {
        "server_public": folder / "server.key",
        "clients": allowed,
    }


def curve_push(endpoint: str, server_public: Path, secret: Path | None) -> zmq.Socket[bytes]:
    """A foreign sender's PUSH socket: with a key pair (CURVE) or plain when `secret` is None."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    if secret is not None:
        push.curve_publickey, push.curve_secretkey = zmq.auth.load_certificate(secret)
        push.curve_serverkey = zmq.auth.load_certificate(server_public)[0]
    push.connect(endpoint)
    return push


def curve_daemon_settings(tmp_path: Path, smtp_port: int) -> tuple[Path, dict[str, Path], str]:
    """Settings for a daemon on all interfaces behind CURVE, its keys, and where to connect;
    the settings' client is `app`, the one authorised key."""
    k = keys(tmp_path / "keys")
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    connect = endpoint.replace("0.0.0.0", "127.0.0.1")
    settings = write_settings(
        tmp_path,
        smtp_port,
        intake={
            "bind": endpoint,
            "curve": {"secret_key_file": str(k["server"]), "authorized_keys_dir": "keys/clients"},
        },
        client={
            "connect": [connect],
            "curve": {
                "server_public_key_file": "keys/server.key",
                "secret_key_file": "keys/app.key_secret",
            },
        },
    )
    return settings, k, connect


def test_only_an_authorised_key_delivers_and_refusals_are_logged(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    settings, k, connect = curve_daemon_settings(tmp_path, smtp_server.port)
    daemon = run_daemon(settings)
    daemon.wait_for_log("CURVE: 1 authorised client keys")
    options: wire.EmailOptions = {"to": "stranger@example.com", "context": CONTEXT}
    frame = wire.encode(wire.request_fields("welcome", options))
    stranger = curve_push(connect, k["server_public"], k["stranger"])
    plain = curve_push(connect, k["server_public"], None)
    try:
        stranger.send(frame)
        plain.send(frame)
        daemon.wait_for_log("refused connection from 127.0.0.1: CURVE key not authorised")
        daemon.wait_for_log("refused connection from a client of intake.bind: handshake failed")
        with Client(daemon.settings) as app:
            app.enqueue_email("welcome", to="app@example.com", context=CONTEXT)
            assert app.flush(10.0)  # its receipt came back over the CURVE receipts socket
        (message,) = smtp_server.wait_for(1)
        assert message.rcpt_tos == ("app@example.com",)
        assert daemon.stop() == 0
    finally:
        stranger.close()
        plain.close()
    assert len(smtp_server.messages) == 1
    assert daemon.counts()["sent"] == 1 and sum(daemon.counts().values()) == 1
    assert "refused " in daemon.log.splitlines()[-1]  # the shutdown line counts refusals


def test_missing_key_file_fails_at_start_naming_the_setting(tmp_path: Path) -> None:
    settings = write_settings(
        tmp_path,
        1025,
        intake={"curve": {"secret_key_file": "nope.key_secret", "authorized_keys_dir": "."}},
    )
    result = run_cli("run", settings=settings)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "intake.curve.secret_key_file: cannot read a ZeroMQ certificate" in result.stderr


def test_half_a_curve_section_is_a_settings_error(tmp_path: Path) -> None:
    settings = write_settings(tmp_path, 1025, client={"curve": {"secret_key_file": "a"}})
    result = run_cli("status", settings=settings)
    assert result.returncode == 2
    assert "client.curve.server_public_key_file: required when client.curve is set" in result.stderr


def test_a_secret_key_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    public, secret = zmq.auth.create_certificates(tmp_path, "app")  # pyzmq's own writer
    settings = ClientSettings(curve=ClientCurveSettings(Path(public), Path(secret)))
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        Path(secret).chmod(0o644)
        secure_client_socket(push, settings)
        assert "app.key_secret is readable by other users; chmod 600 it" in caplog.text
        caplog.clear()
        Path(secret).chmod(0o600)
        secure_client_socket(push, settings)
        assert caplog.text == ""
        assert push.getsockopt(zmq.MECHANISM) == zmq.CURVE


# -- revoking and adding keys without a restart (SIGHUP, `systemctl reload`) ----------------------

FRAME = wire.encode(wire.request_fields("welcome", {"to": "a@example.com", "context": CONTEXT}))


def wait_for_event(monitor: zmq.Socket[bytes], event: int, timeout: float = 10.0) -> None:
    """Block (bounded) until `monitor` reports `event` for its socket."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and monitor.poll(int(left * 1000)):
        if parse_monitor_message(monitor.recv_multipart())["event"] == event:
            return
    raise AssertionError(f"no {zmq.Event(event).name} within {timeout} s")


def test_a_removed_key_is_cut_off_and_refused_after_reload(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    settings, k, connect = curve_daemon_settings(tmp_path, smtp_server.port)
    daemon = run_daemon(settings)
    app = curve_push(connect, k["server_public"], k["app"])
    events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
    monitor = cast(zmq.Socket[bytes], app.get_monitor_socket(events))
    try:
        app.send(FRAME)
        smtp_server.wait_for(1)
        wait_for_event(monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED)
        (k["clients"] / "app.key").unlink()
        daemon.reload()
        daemon.wait_for_log("0 keys allowed; removed: app.key; added: none")
        wait_for_event(monitor, zmq.EVENT_DISCONNECTED)  # its open connection was closed
        app.send(FRAME)
        daemon.wait_for_log("refused connection from 127.0.0.1: CURVE key not authorised")
        assert daemon.stop() == 0
    finally:
        app.disable_monitor()
        monitor.close()
        app.close()
    assert len(smtp_server.messages) == 1 and sum(daemon.counts().values()) == 1
    assert "secret" not in daemon.log.lower() and k["app"].read_text() not in daemon.log


def test_a_key_added_after_start_delivers_after_reload(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    settings, k, connect = curve_daemon_settings(tmp_path, smtp_server.port)
    daemon = run_daemon(settings)
    refused = curve_push(connect, k["server_public"], k["stranger"])
    refused.send(FRAME)  # never delivered: libzmq gives up a connection ZAP refused
    daemon.wait_for_log("refused connection from 127.0.0.1: CURVE key not authorised")
    refused.close()
    shutil.copy(k["server_public"].parent / "stranger.key", k["clients"])
    daemon.reload()
    daemon.wait_for_log("2 keys allowed; removed: none; added: stranger.key")
    stranger = curve_push(connect, k["server_public"], k["stranger"])
    try:
        stranger.send(FRAME)
        (message,) = smtp_server.wait_for(1)
        assert message.rcpt_tos == ("a@example.com",)
    finally:
        stranger.close()


@pytest.mark.parametrize("breakage", ["unreadable key", "folder gone"])
def test_a_broken_allowlist_on_reload_keeps_the_old_one(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon, breakage: str
) -> None:
    settings, k, _ = curve_daemon_settings(tmp_path, smtp_server.port)
    daemon = run_daemon(settings)
    if breakage == "folder gone":
        k["clients"].rename(tmp_path / "elsewhere")
    else:
        (k["clients"] / "broken.key").write_text("not a certificate\n")
    daemon.reload()
    daemon.wait_for_log("ERROR dispatcher.curve: CURVE allowlist not reloaded, keeping 1 keys")
    with Client(daemon.settings) as app:
        app.enqueue_email("welcome", to="app@example.com", context=CONTEXT)
        assert app.flush(10.0)
    smtp_server.wait_for(1)
    assert daemon.alive


def test_reload_without_curve_says_there_is_nothing_to_reload(
    tmp_path: Path, run_daemon: RunDaemon
) -> None:
    daemon = run_daemon(write_settings(tmp_path, 1025))
    daemon.reload()
    daemon.wait_for_log("reload: nothing to reload without intake.curve")
    assert daemon.alive


def test_sighup_to_dispatcher_run_reloads_the_allowlist(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    settings, k, _ = curve_daemon_settings(tmp_path, free_port())
    daemon = start_daemon(settings)
    (k["clients"] / "app.key").unlink()
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_log("0 keys allowed; removed: app.key; added: none")
    daemon.wait_for_log("closed every intake and receipts connection")
    assert daemon.stop() == 0
