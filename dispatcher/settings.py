"""Settings: one typed, frozen object, built in one place from YAML, overrides and environment.

Precedence, lowest first: the defaults below (identical to the shipped settings.yaml), the
settings file, `configure(**overrides)`, then environment variables named
`DISPATCHER_<SECTION>__<KEY>` (for example `DISPATCHER_SMTP__PORT=2525`). Environment values
are read as YAML scalars, so `DISPATCHER_CLIENT__CONNECT='[tcp://10.0.0.5:5559]'` gives a list.
Relative paths are relative to the settings file's folder (the working directory without one).
"""

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import parse_qs, urlsplit

import yaml

from dispatcher.errors import SettingsError
from dispatcher.hosts import is_loopback

ENV_PREFIX = "DISPATCHER_"
SETTINGS_ENV = "DISPATCHER_SETTINGS"
PASSWORD_ENV = "DISPATCHER_SMTP_PASSWORD"
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
# libyaml's safe loader where PyYAML was built with it (its wheels are): the same documents and
# types as yaml.safe_load, parsed in C. Pure-Python parsing of settings.yaml was most of a first
# enqueue_email() without configure() (`benchmarks/startup.py`).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_password(path: Path | None, key: str) -> str | None:
    """A password file's first line (the trailing newline an editor adds is not part of it)."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{key}: cannot read: {exc.strerror}") from None


@dataclass(frozen=True, slots=True)
class ServerCurveSettings:
    """The daemon's CURVE key and the public keys of the clients allowed in (dispatcher.curve)."""

    secret_key_file: Path | None = None
    authorized_keys_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class ClientCurveSettings:
    """The client's own CURVE key and the daemon's public key (dispatcher.curve)."""

    server_public_key_file: Path | None = None
    secret_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class IntakeSettings:
    """The daemon's sockets."""

    bind: str = "tcp://127.0.0.1:5559"
    acks: str = "tcp://127.0.0.1:5560"
    curve: ServerCurveSettings | None = None  # required to bind anywhere but loopback or ipc


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where `enqueue_email()` hands requests over."""

    connect: tuple[str, ...] = ("tcp://127.0.0.1:5559",)
    acks: tuple[str, ...] = ("tcp://127.0.0.1:5560",)
    overflow_dir: Path = Path("var/overflow")
    ack_timeout: float = 2.0  # no receipt after this: send again; after twice this: spill
    exit_wait: float = 2.0  # at interpreter exit, wait this long for receipts, then spill
    curve: ClientCurveSettings | None = None


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """The store that is the source of truth for every accepted request: a SQLite file, or a
    PostgreSQL database shared by several daemons when `url` is set."""

    path: Path = Path("var/spool.sqlite3")
    url: str | None = None  # postgresql://user@host/db; the password never here (see below)
    password_file: Path | None = None  # the database password, else libpq reads PGPASSWORD
    keep_sent: float = 604800.0  # seconds a sent request stays for inspection (7 days)
    lease: float = 60.0  # seconds a daemon's claim on a request lasts unless it renews it

    def where(self) -> str:
        """The store as people name it, in reports and errors: the URL (never with a
        password: `url` holds none) or the file."""
        return self.url if self.url is not None else str(self.path)

    def password(self) -> str | None:
        """The database password from `password_file`; None leaves it to libpq (PGPASSWORD)."""
        return _read_password(self.password_file, "spool.password_file")


@dataclass(frozen=True, slots=True)
class TemplatesSettings:
    """The folder of templates, one sub-folder per template name."""

    dir: Path = Path("templates")
    # Worker processes that render (Jinja, CSS, MIME) beside the event loop; 0 renders on it.
    render_processes: int = 1
    render_timeout: float = 10.0  # seconds a render may take before its request is dead
    locale: str = "en"  # of a request that names none (dispatcher.locales)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """One mail server to deliver to: `smtp` itself, or one of `smtp.fallback`."""

    host: str = "127.0.0.1"
    port: int = 1025
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None  # CA bundle (PEM) to verify the server with, e.g. a private CA
    timeout: float = 30.0
    connections: int = 8
    rate: float | None = None  # messages per second over all its connections; None: no limit
    probe: tuple[float, float] = (5.0, 300.0)  # first and longest delay between probes when down

    @property
    def name(self) -> str:
        """`host:port`, as logs, metrics and `status` name the relay."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def password(self) -> str | None:
        """The relay's password, from `password_file`; never from YAML."""
        return _read_password(self.password_file, f"relay {self.name}: password_file")


@dataclass(frozen=True, slots=True)
class SmtpSettings(RelaySettings):
    """The mail server every message is delivered to, and the relays used while it is down."""

    fallback: tuple[RelaySettings, ...] = ()  # in order, each while the ones before are down

    def password(self) -> str | None:
        """The SMTP password: from the environment, else from `password_file`, never YAML."""
        if PASSWORD_ENV in os.environ:
            return os.environ[PASSWORD_ENV]
        return _read_password(self.password_file, "smtp.password_file")

    @property
    def relays(self) -> tuple[RelaySettings, ...]:
        """This relay, then its fallbacks: the order in which they are used."""
        return (self, *self.fallback)


@dataclass(frozen=True, slots=True)
class DomainLimit:
    """How fast, and over how many connections at once, mail to one recipient domain goes."""

    rate: float | None = None  # messages per second; None: no limit
    connections: int | None = None  # sends in flight at once; None: no limit


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """Limits per recipient domain (`limits.domains`), across all connections and relays."""

    # Out of the hash (equality still compares it): every other section is hashable, and so
    # Settings stays a usable key (`dispatcher.testing` caches a renderer per Settings).
    domains: dict[str, DomainLimit] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class MailSettings:
    """Defaults for the messages themselves."""

    from_: str = "Example <noreply@example.com>"
    # Staging: every recipient becomes these addresses (originals in X-Original-To), except
    # those at the domains of `redirect_except` (and their subdomains).
    redirect_to: tuple[str, ...] = ()
    redirect_except: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """When a temporary failure is tried again, and when the dispatcher gives up."""

    attempts: int = 8
    backoff: tuple[float, float] = (30.0, 3600.0)
    max_age: float = 432000.0


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How much the daemon and the commands log (`--log-level` overrides it)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus endpoint: off unless `bind` is set, and only ever on loopback."""

    bind: str | None = None

    def address(self) -> tuple[str, int] | None:
        """(host, port) to serve on, or None when off; a `SettingsError` if not loopback."""
        if self.bind is None:
            return None
        host, _, port = self.bind.rpartition(":")
        host = host.strip("[]")
        if not (is_loopback(host) and port.isdigit() and 0 < int(port) < 65536):
            raise SettingsError(
                f"metrics.bind: expected a loopback HOST:PORT such as 127.0.0.1:9464,"
                f" got {self.bind!r}"
            )
        return host, int(port)


@dataclass(frozen=True, slots=True)
class DkimSettings:
    """The key that signs mail From this domain (dispatcher.dkim); no signing without it."""

    domain: str
    selector: str
    key_file: Path  # PEM (rsa-sha256) or as `keygen --dkim` writes it; e.g. a systemd credential
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the client and the daemon are configured with."""

    intake: IntakeSettings = field(default_factory=IntakeSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    templates: TemplatesSettings = field(default_factory=TemplatesSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    mail: MailSettings = field(default_factory=MailSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    dkim: DkimSettings | None = None
    source: Path | None = None  # the settings file, for messages; None means defaults only


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    client_only: bool = False,
) -> Settings:
    """Find, read, merge and validate the settings; every problem is a `SettingsError`.

    `client_only` is for an app's process: what only the daemon reads (`mail.from`, checked
    with email-validator, which costs a first request ~20 ms to import) is left to the daemon.
    """
    environ = os.environ if environ is None else environ
    source = _find(path, environ)
    raw = _read(source) if source else {}
    for key, value in (overrides or {}).items():
        _merge(raw, key.split("__"), value)
    for name, text in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name.removeprefix(ENV_PREFIX).lower().split("__")
            _merge(raw, dotted, _env_value(name, text))
    base = source.parent if source else Path.cwd()
    settings = _build(Settings, raw, "", base)
    checked = _checked(replace(settings, source=source))
    return checked if client_only else _daemon_checked(checked)


def _find(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    if path is None and environ.get(SETTINGS_ENV):
        path = environ[SETTINGS_ENV]
    if path is not None:
        if not Path(path).is_file():
            raise SettingsError(f"settings file not found: {path}")
        return Path(path).resolve()
    default = Path("settings.yaml")
    return default.resolve() if default.is_file() else None


def _read(source: Path) -> dict[str, Any]:
    try:
        data = yaml.load(source.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{source}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{source}: cannot read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: expected a mapping of sections at the top level")
    return data


def _env_value(name: str, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError:
        raise SettingsError(f"{name}: not a valid YAML value: {text!r}") from None


def _merge(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set `value` at the dotted path `keys`, turning a section given as a dict into a merge."""
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SettingsError(f"{'.'.join(keys)}: {key} is not a section")
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(keys[-1]), dict):
        for sub_key, sub_value in value.items():
            _merge(node[keys[-1]], [sub_key], sub_value)
    else:
        node[keys[-1]] = value


def _build(cls: type[Any], raw: object, prefix: str, base: Path) -> Any:
    """Build dataclass `cls` from `raw`, checking every key and type against the annotations."""
    where = prefix.rstrip(".") or "settings"
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: expected a section (mapping), got {_shown(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name.rstrip("_"): f.name for f in fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SettingsError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(known)})")
    values = {
        known[key]: _coerce(value, hints[known[key]], f"{prefix}{key}", base)
        for key, value in raw.items()
    }
    for f in fields(cls):  # absent sections are built too, so default paths get the same base
        if f.name in values or f.name == "source":
            continue
        if is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], {}, f"{prefix}{f.name}.", base)
        elif isinstance(f.default, Path):
            values[f.name] = base / f.default
        elif f.default is MISSING and f.default_factory is MISSING:
            raise SettingsError(f"{prefix}{f.name}: required when {where} is set")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, base: Path) -> Any:
    """Check one value against its annotation; YAML's `on`/`NO`/`22:30` surprises fail here."""
    origin, args = get_origin(hint), get_args(hint)
    if is_dataclass(hint):
        return _build(hint, value, key + ".", base)  # type: ignore[arg-type]
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, base)
    if origin is Literal:
        if value not in args:
            raise SettingsError(f"{key}: expected one of {', '.join(args)}, got {_shown(value)}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, args, key, base)
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{key}: expected a mapping, got {_shown(value)}")
        return {str(k).lower(): _coerce(v, args[1], f"{key}.{k}", base) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{key}: expected true or false, got {_shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key}: expected an integer, got {_shown(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(f"{key}: expected a number, got {_shown(value)}")
        return float(value)
    if hint is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise SettingsError(f"{key}: expected a path, got {_shown(value)}")
        return base / value
    if not isinstance(value, str):
        raise SettingsError(f"{key}: expected a string, got {_shown(value)}")
    return value


def _coerce_tuple(value: Any, args: tuple[Any, ...], key: str, base: Path) -> tuple[Any, ...]:
    if isinstance(value, str) and args[-1] is Ellipsis:
        value = [value]
    if not isinstance(value, list | tuple):
        raise SettingsError(f"{key}: expected a list, got {_shown(value)}")
    if args[-1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]", base) for i, v in enumerate(value))
    if len(value) != len(args):
        raise SettingsError(f"{key}: expected a list of {len(args)} items, got {len(value)}")
    return tuple(
        _coerce(v, a, f"{key}[{i}]", base) for i, (v, a) in enumerate(zip(value, args, strict=True))
    )


def _shown(value: object) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def _check_content(settings: Settings) -> None:
    """The keys of templates and DKIM whose values have a shape beyond their type."""
    import re

    if not re.fullmatch(r"[A-Za-z]{2,8}([_-][A-Za-z0-9]{1,8})*", settings.templates.locale):
        raise SettingsError(
            f"templates.locale: {settings.templates.locale!r} is not a locale such as en or de-AT"
        )
    dkim = settings.dkim
    if dkim is not None:
        if not re.fullmatch(r"(?=.{1,253}\Z)([A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,63}", dkim.domain):
            raise SettingsError(f"dkim.domain: {dkim.domain!r} is not a domain name")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", dkim.selector):
            raise SettingsError(f"dkim.selector: {dkim.selector!r} is not a DKIM selector")


def _check_database_url(url: str) -> None:
    """A libpq URL without a password: settings files get copied, pasted and committed."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise SettingsError(
            "spool.url: expected a postgresql:// URL such as"
            f" postgresql://dispatcher@db.internal/dispatcher, got scheme {parts.scheme!r}"
        )
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise SettingsError(
            "spool.url: holds a password; put it in spool.password_file or the PGPASSWORD"
            " environment variable instead"
        )


def _checked(settings: Settings) -> Settings:
    """Rules that span a value's meaning, not just its type."""
    for key, endpoint in [
        ("intake.bind", settings.intake.bind),
        ("intake.acks", settings.intake.acks),
        *((f"client.connect[{i}]", e) for i, e in enumerate(settings.client.connect)),
        *((f"client.acks[{i}]", e) for i, e in enumerate(settings.client.acks)),
    ]:
        if not endpoint.startswith(ENDPOINT_SCHEMES):
            raise SettingsError(
                f"{key}: {endpoint!r} is not a tcp://, ipc:// or inproc:// endpoint"
            )
    if not settings.client.connect:
        raise SettingsError("client.connect: at least one endpoint is required")
    if settings.client.ack_timeout <= 0 or settings.client.exit_wait < 0:
        raise SettingsError("client.ack_timeout must be positive and client.exit_wait >= 0")
    if settings.spool.keep_sent < 0:
        raise SettingsError("spool.keep_sent: must be 0 or more seconds")
    if settings.spool.lease < 5:
        raise SettingsError("spool.lease: must be at least 5 seconds")
    if settings.spool.url is not None:
        _check_database_url(settings.spool.url)
    for key, curve in [
        ("intake.curve", settings.intake.curve),
        ("client.curve", settings.client.curve),
    ]:
        missing = [f.name for f in fields(curve) if getattr(curve, f.name) is None] if curve else []
        if missing:
            raise SettingsError(f"{key}.{missing[0]}: required when {key} is set")
    smtp, retry = settings.smtp, settings.retry
    if not 0 <= settings.templates.render_processes <= 64:
        raise SettingsError("templates.render_processes: expected 0 to 64")
    _check_relays(smtp)
    for domain, limit in settings.limits.domains.items():
        if (limit.rate is not None and limit.rate <= 0) or (
            limit.connections is not None and limit.connections < 1
        ):
            raise SettingsError(f"limits.domains.{domain}: rate and connections must be positive")
    if settings.templates.render_timeout <= 0:
        raise SettingsError("templates.render_timeout: must be a positive number of seconds")
    first, longest = retry.backoff
    if not 0 < first <= longest:
        raise SettingsError(
            "retry.backoff: expected [first, longest] with 0 < first <= longest,"
            f" got {list(retry.backoff)}"
        )
    if retry.attempts < 1 or retry.max_age <= 0:
        raise SettingsError("retry.attempts and retry.max_age: must be positive")
    settings.metrics.address()  # raises for an address that is not loopback
    return settings


def _daemon_checked(settings: Settings) -> Settings:
    """Rules for what only the daemon and the commands read, costly to check in an app."""
    _check_content(settings)
    from dispatcher.address import parse_address  # lazy: email-validator is slow to import
    from dispatcher.errors import InvalidRequest

    try:
        parse_address(settings.mail.from_, "mail.from")
        for i, address in enumerate(settings.mail.redirect_to):
            parse_address(address, f"mail.redirect_to[{i}]")
    except InvalidRequest as exc:
        raise SettingsError(str(exc)) from None
    if settings.mail.redirect_except and not settings.mail.redirect_to:
        raise SettingsError("mail.redirect_except: only meaningful with mail.redirect_to")
    for i, domain in enumerate(settings.mail.redirect_except):
        if "@" in domain or not domain.strip(".") or " " in domain:
            raise SettingsError(f"mail.redirect_except[{i}]: expected a domain, got {domain!r}")
    return settings


def _check_relays(smtp: SmtpSettings) -> None:
    """Each relay's own keys; errors name the relay's key (`smtp.fallback[0].port`)."""
    keys = ["smtp", *(f"smtp.fallback[{i}]" for i in range(len(smtp.fallback)))]
    for key, relay in zip(keys, smtp.relays, strict=True):
        if not 0 < relay.port < 65536:
            raise SettingsError(f"{key}.port: {relay.port} is not a TCP port")
        if relay.connections < 1 or relay.timeout <= 0:
            raise SettingsError(f"{key}.connections and {key}.timeout: must be positive")
        if relay.rate is not None and relay.rate <= 0:
            raise SettingsError(f"{key}.rate: must be positive (or unset for no limit)")
        first, longest = relay.probe
        if not 0 < first <= longest:
            raise SettingsError(
                f"{key}.probe: expected [first, longest] with 0 < first <= longest,"
                f" got {list(relay.probe)}"
            )
    names = [relay.name for relay in smtp.relays]
    if len(set(names)) < len(names):
        raise SettingsError(f"smtp.fallback: a relay is listed twice ({', '.join(names)})")
