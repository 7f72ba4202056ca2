"""Settings: the shipped file equals the defaults, and every mistake names its dotted key."""

from pathlib import Path

import pytest

from dispatcher.errors import SettingsError
from dispatcher.settings import Settings, load_settings

ROOT = Path(__file__).parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_shipped_settings_equal_the_built_in_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    shipped = load_settings(ROOT / "settings.yaml", environ={})
    defaults = load_settings(None, environ={})  # ./settings.yaml is found from the cwd
    monkeypatch.chdir(ROOT / "tests")
    built_in = load_settings(None, environ={})  # no file here: defaults, relative to the cwd
    assert shipped == defaults
    assert built_in.smtp == shipped.smtp and built_in.retry == shipped.retry
    assert built_in.spool.path == ROOT / "tests" / "var" / "spool.sqlite3"


def test_paths_are_relative_to_the_settings_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "spool:\n  path: data/q.db\n"), environ={})
    assert settings.spool.path == tmp_path / "data" / "q.db"
    assert settings.templates.dir == tmp_path / "templates"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("smtp:\n  port: abc\n", "smtp.port: expected an integer, got str 'abc'"),
        ("smtp:\n  prot: 25\n", "smtp.prot: unknown key"),
        ("smtpp:\n  port: 25\n", "smtpp: unknown key"),
        (
            "smtp:\n  security: on\n",
            "smtp.security: expected one of none, starttls, tls, got bool True",
        ),
        ("retry:\n  backoff: [30]\n", "retry.backoff: expected a list of 2 items, got 1"),
        ("retry:\n  backoff: [60, 30]\n", "retry.backoff: expected [first, longest]"),
        ("retry:\n  attempts: 2.5\n", "retry.attempts: expected an integer"),
        ("client:\n  connect: [5559]\n", "client.connect[0]: expected a string, got int 5559"),
        (
            "client:\n  connect: [127.0.0.1:5559]\n",
            "client.connect[0]: '127.0.0.1:5559' is not a tcp://",
        ),
        ("mail:\n  from: not an address\n", "mail.from: 'not an address' is not a valid address"),
        ("smtp: 25\n", "smtp: expected a section (mapping), got int 25"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("smtp: [\n", "not valid YAML"),
    ],
)
def test_a_mistake_is_an_error_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=None) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert message in str(caught.value)


def test_environment_overrides_the_file_with_typed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "smtp:\n  port: 2525\n")
    environ = {
        "DISPATCHER_SMTP__PORT": "2626",
        "DISPATCHER_CLIENT__CONNECT": "[tcp://127.0.0.1:1, tcp://127.0.0.1:2]",
        "DISPATCHER_SMTP_PASSWORD": "not a settings key",
    }
    settings = load_settings(path, environ=environ)
    assert settings.smtp.port == 2626
    assert settings.client.connect == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")


def test_environment_mistakes_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"smtp\.port: expected an integer"):
        load_settings(None, environ={"DISPATCHER_SMTP__PORT": "many"})
    with pytest.raises(SettingsError, match=r"smtp\.nope: unknown key"):
        load_settings(None, environ={"DISPATCHER_SMTP__NOPE": "1"})


def test_overrides_merge_into_sections(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "smtp:\n  port: 2525\n"),
        {"smtp": {"connections": 2}, "retry__attempts": 3},
        environ={},
    )
    assert (settings.smtp.port, settings.smtp.connections, settings.retry.attempts) == (2525, 2, 3)


def test_missing_settings_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(None, environ={"DISPATCHER_SETTINGS": str(tmp_path / "nope.yaml")})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.smtp.port = 1  # type: ignore[misc]


def test_password_comes_from_environment_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    settings = load_settings(write(tmp_path, f"smtp:\n  password_file: {secret}\n"), environ={})
    monkeypatch.delenv("DISPATCHER_SMTP_PASSWORD", raising=False)
    assert settings.smtp.password() == "s3cret"
    monkeypatch.setenv("DISPATCHER_SMTP_PASSWORD", "from-env")
    assert settings.smtp.password() == "from-env"
