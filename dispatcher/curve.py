"""Who may talk to the daemon: loopback and ipc:// by default, CURVE plus an allowlist otherwise.

CURVE alone authenticates nobody (without a ZAP authenticator any key is accepted), so every
CURVE server socket gets `ZAP_DOMAIN` and `start_authenticator()` answers for it from
`intake.curve.authorized_keys_dir`. A plain client is refused by libzmq before ZAP is asked, so
`Gatekeeper.watch()` logs those refusals from a socket monitor. Keys are ZeroMQ certificates;
`keygen()` writes the secret one owner-only (pyzmq writes it world-readable). The same keys seal
spill files (`spill_seal()`, `SpillKeys`), so the overflow folder admits no one the sockets refuse.
"""

import asyncio
import hashlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from dispatcher.errors import SettingsError, StartupError, UsageError
from dispatcher.hosts import is_loopback
from dispatcher.overflow import Seal
from dispatcher.permissions import owner_only, private_dir
from dispatcher.settings import ClientSettings, IntakeSettings, ServerCurveSettings

log = logging.getLogger(__name__)

ZAP_DOMAIN = "dispatcher"
# A refused client reconnects every ~100 ms; one log line per peer and reason this often is enough.
REFUSAL_LOG_INTERVAL = 60.0
SPILL_KEY_LABEL = b"dispatcher spill file MAC v1"  # keeps this key apart from CURVE's own uses


def check_bind_allowed(key: str, endpoint: str, curve: ServerCurveSettings | None) -> None:
    """Refuse (`SettingsError`) to bind `endpoint` beyond this host without CURVE.

    `key` names the setting in the message (`intake.bind`, `intake.acks`). Allowed without
    CURVE: ipc:// and inproc://, and tcp:// on a loopback address or `localhost`. Anything else
    (`*`, `0.0.0.0`, a LAN address, an interface or host name) needs `intake.curve`.
    """
    if curve is not None or is_local(endpoint):
        return
    raise SettingsError(
        f"{key}: refusing to bind {endpoint} without CURVE: anyone who can reach it could send"
        " mail in your name; bind 127.0.0.1 or ipc://, or set intake.curve.secret_key_file and"
        " intake.curve.authorized_keys_dir (see 'dispatcher keygen')"
    )


def is_local(endpoint: str) -> bool:
    """Whether only processes on this host can reach `endpoint`."""
    scheme, _, address = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    return is_loopback(address.rpartition(":")[0])


def secure_server_socket(socket: zmq.Socket[Any], intake: IntakeSettings) -> None:
    """Make `socket` a CURVE server checked by ZAP, when `intake.curve` is set; else a no-op.

    Call before `bind()`. The daemon must also run `start_authenticator()` on the socket's
    context, or libzmq would wait for a ZAP handler that never answers and accept nobody.
    """
    if intake.curve is None:
        return
    public, secret = _load_key_pair(intake.curve.secret_key_file, "intake.curve.secret_key_file")
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_server = True
    socket.zap_domain = ZAP_DOMAIN.encode()


def secure_client_socket(socket: zmq.Socket[Any], client: ClientSettings) -> None:
    """Make `socket` a CURVE client of the daemon, when `client.curve` is set; else a no-op.

    Call before `connect()`. Works for the PUSH request socket and the SUB receipts socket alike.
    """
    if client.curve is None:
        return
    server_key = _load_public_key(
        client.curve.server_public_key_file, "client.curve.server_public_key_file"
    )
    public, secret = _load_key_pair(client.curve.secret_key_file, "client.curve.secret_key_file")
    socket.curve_serverkey = server_key
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def spill_seal(client: ClientSettings) -> Seal | None:
    """How this client signs its spill files under `client.curve`; None without it."""
    if client.curve is None:
        return None
    server = _load_public_key(
        client.curve.server_public_key_file, "client.curve.server_public_key_file"
    )
    public, secret = _load_key_pair(client.curve.secret_key_file, "client.curve.secret_key_file")
    return Seal(public, spill_mac_key(secret, server, client_public=public, server_public=server))


class SpillKeys:
    """The daemon's side of spill-file seals: the MAC key it shares with each client key."""

    def __init__(self, intake: IntakeSettings) -> None:
        assert intake.curve is not None
        self.public, self.secret = _load_key_pair(
            intake.curve.secret_key_file, "intake.curve.secret_key_file"
        )
        self._keys: dict[bytes, bytes] = {}  # client public key -> MAC key; fixed per pair

    def mac_key(self, client_public: bytes) -> bytes:
        """Ask only for a key of the allowlist: they are cached, and a key from a file is not
        checked as a curve point here."""
        key = self._keys.get(client_public)
        if key is None:
            key = spill_mac_key(
                self.secret, client_public, client_public=client_public, server_public=self.public
            )
            self._keys[client_public] = key
        return key


def spill_mac_key(
    secret: bytes, peer: bytes, *, client_public: bytes, server_public: bytes
) -> bytes:
    """The key a client and the daemon share for spill-file MACs, from Z85 CURVE keys: X25519
    of one's secret key and the other's public key, which only these two can compute, hashed
    with a label and both public keys (so it serves no other purpose and binds both)."""
    from nacl.bindings import crypto_scalarmult  # only under CURVE: ~7 ms to import

    shared = crypto_scalarmult(z85.decode(secret), z85.decode(peer))
    return hashlib.sha256(SPILL_KEY_LABEL + shared + client_public + server_public).digest()


def start_authenticator(
    context: zmq.Context[Any], intake: IntakeSettings, counts: Counter[str] | None = None
) -> "Gatekeeper | None":
    """Start answering ZAP requests with the allowlist of `intake.curve.authorized_keys_dir`.

    Returns None without `intake.curve`. Needs a running asyncio loop and a `zmq.asyncio`
    context (the daemon's). Every refusal is logged (at most once a minute per peer and reason)
    and counted in `counts["refused"]`. The daemon calls `stop()` before terminating the context.
    """
    if intake.curve is None:
        return None
    folder = intake.curve.authorized_keys_dir
    assert folder is not None  # settings require both keys together
    try:
        allowed = read_allowlist(folder)
    except (OSError, ValueError) as exc:
        raise StartupError(f"intake.curve.authorized_keys_dir: {exc}") from None
    if not allowed:
        log.warning("no client keys (*.key) in %s: every client will be refused", folder)
    gate = Gatekeeper(context, Counter() if counts is None else counts, folder)
    gate.start()
    gate.allow_keys(allowed)
    log.info("CURVE: %d authorised client keys from %s", len(allowed), folder)
    return gate


def read_allowlist(folder: Path) -> dict[str, bytes]:
    """The public keys of `folder/*.key` by file name; raises OSError or ValueError on a folder
    or key that cannot be read, so a caller can keep the allowlist it has."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    allowed = {}
    for path in sorted(folder.glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        allowed[path.name] = public
    return allowed


def keygen(name: str, folder: Path) -> tuple[Path, Path]:
    """Write `NAME.key` (public, 0644) and `NAME.key_secret` (secret, 0600) into `folder`.

    The secret file is owner-only from the moment it exists (pyzmq's own writer leaves it
    world-readable). Existing keys are never overwritten.
    """
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"keygen: {name!r} is not a plain file name")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise UsageError(f"keygen: {path} exists; refusing to overwrite a key")
    private_dir(folder)
    with owner_only():
        zmq.auth.create_certificates(folder, name)
    public.chmod(0o644)  # a public key is meant to be copied around
    return public, secret


class RefusalLog:
    """Whether a refusal is worth a log line: a refused client retries every ~100 ms, or
    spills many files, so each peer and reason is logged once per REFUSAL_LOG_INTERVAL."""

    def __init__(self) -> None:
        self._last_logged: dict[tuple[str, str], float] = {}

    def due(self, peer: str, reason: str) -> bool:
        now = time.monotonic()
        last = self._last_logged.get((peer, reason))
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return False
        if len(self._last_logged) > 10_000:  # many peers: forget them rather than grow
            self._last_logged.clear()
        self._last_logged[(peer, reason)] = now
        return True


class Gatekeeper(AsyncioAuthenticator):
    """pyzmq's ZAP authenticator, plus a log line and a count for every refused connection."""

    def __init__(self, context: zmq.Context[Any], counts: Counter[str], folder: Path) -> None:
        super().__init__(context)
        self.counts = counts
        self.folder = folder
        self.allowed: dict[str, bytes] = {}
        self._peer = "?"
        self.refusals = RefusalLog()
        self._watchers: list[tuple[zmq.Socket[Any], zmq.asyncio.Socket, asyncio.Task[None]]] = []

    def allow_keys(self, allowed: dict[str, bytes]) -> None:
        """Answer ZAP from now on with these keys (file name: z85 public key) alone."""
        self.allowed = allowed
        self.certs[ZAP_DOMAIN] = {key: True for key in allowed.values()}

    def reload(self) -> list[str]:
        """Re-read the allowlist folder (SIGHUP) and return the file names no longer allowed.

        A folder or key that cannot be read keeps the allowlist in force and logs an error:
        a typo while editing keys must not lock every client out or stop the daemon.
        """
        try:
            allowed = read_allowlist(self.folder)
        except (OSError, ValueError) as exc:
            log.error("CURVE allowlist not reloaded, keeping %d keys: %s", len(self.allowed), exc)
            return []
        old = self.allowed
        removed = [name for name in old if allowed.get(name) != old[name]]
        added = [name for name in allowed if old.get(name) != allowed[name]]
        self.allow_keys(allowed)
        log.info(
            "CURVE allowlist reloaded from %s: %d keys allowed; removed: %s; added: %s",
            self.folder,
            len(allowed),
            ", ".join(removed) or "none",
            ", ".join(added) or "none",
        )
        return removed

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous"
    ) -> None:
        super()._send_zap_reply(request_id, status_code, status_text, user_id)
        if status_code != b"200":
            self.refused(self._peer, f"CURVE key not authorised ({status_text.decode()})")

    def refused(self, peer: str, reason: str) -> None:
        """Count a refusal; log it unless the same peer was refused for the same reason lately."""
        self.counts["refused"] += 1
        if self.refusals.due(peer, reason):
            log.warning("refused connection from %s: %s", peer, reason)

    def watch(self, socket: zmq.Socket[Any], key: str) -> None:
        """Also log connections libzmq refuses before asking ZAP: plain clients on `socket`.

        `key` names the socket's setting (`intake.bind`), which the log line shows.
        """
        # PROTOCOL: a plain client or a wrong server key; NO_DETAIL: the same, when the client
        # noticed first and hung up, or a connection that never spoke ZMTP at all.
        events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        monitor = socket.get_monitor_socket(events)
        monitor = cast(zmq.asyncio.Socket, monitor)  # a zmq.asyncio context makes asyncio sockets
        task = asyncio.ensure_future(self._watch(monitor, key))
        self._watchers.append((socket, monitor, task))

    async def _watch(self, monitor: zmq.asyncio.Socket, key: str) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            error = zmq.Event(event["event"]).name
            reason = f"handshake failed ({error}); not a CURVE client with this server's key?"
            self.refused(f"a client of {key}", reason)

    def stop(self) -> None:
        """Stop the watchers and the ZAP handler; call before the context is terminated, which
        would otherwise wait forever for these sockets."""
        for socket, monitor, task in self._watchers:
            task.cancel()
            socket.disable_monitor()
            monitor.close(linger=0)
        self._watchers.clear()
        if self.zap_socket is not None:
            self.zap_socket.linger = 0
        super().stop()


def _load_key_pair(path: Path | None, key: str) -> tuple[bytes, bytes]:
    public, secret = _load(path, key)
    if secret is None:
        raise SettingsError(f"{key}: {path} holds no secret key (is it the public .key file?)")
    return public, secret


def _load_public_key(path: Path | None, key: str) -> bytes:
    return _load(path, key)[0]


def _load(path: Path | None, key: str) -> tuple[bytes, bytes | None]:
    if path is None:
        raise SettingsError(f"{key}: required")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{key}: cannot read a ZeroMQ certificate from {path}: {exc}") from None
    if path.stat().st_mode & 0o077 and secret is not None:
        log.warning("%s: %s is readable by other users; chmod 600 it", key, path)
    return public, secret
