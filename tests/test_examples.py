"""The examples run as a new user would run them: each app with its framework's test client, a
daemon in this process and a real SMTP server; a templated and an untemplated mail each."""

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

import dispatcher
from tests.daemon import InProcessDaemon, write_settings
from tests.django_project import django_project  # noqa: F401  (fixture)
from tests.smtp_server import ReceivedMessage, SmtpServer

RunDaemon = Callable[..., InProcessDaemon]
EXAMPLES = Path(__file__).parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("fresh_client")


def load(name: str) -> ModuleType:
    """examples/NAME/app.py as a module of its own (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / name / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def delivered(daemon: InProcessDaemon, smtp: SmtpServer, count: int) -> dict[str, ReceivedMessage]:
    assert dispatcher.flush(10)
    daemon.wait_for_counts(sent=count)
    return {str(m.message["Subject"]): m for m in smtp.wait_for(count, timeout=30)}


@pytest.fixture
def daemon(tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon) -> InProcessDaemon:
    return run_daemon(write_settings(tmp_path, smtp_server.port))


def test_flask_app(daemon: InProcessDaemon, smtp_server: SmtpServer) -> None:
    app = load("flask_app").create_app(str(daemon.settings_path))
    client = app.test_client()
    signup = client.post("/signup", data={"email": "ada@example.com", "name": "Ada"})
    assert signup.status_code == 201
    contact = client.post("/contact", data={"message": "Where is <my> order?"})
    assert contact.status_code == 201
    assert client.post("/signup", data={"email": "ada@localhost", "name": "A"}).status_code == 400

    mail = delivered(daemon, smtp_server, 2)
    welcome = mail["Welcome to Example, Ada!"]
    assert welcome.rcpt_tos == ("ada@example.com",)
    assert welcome.message_id == f"<{signup.json['queued']}@example.com>"
    text = mail["Contact form"].message.get_body(("plain",))
    assert text is not None and text.get_content().strip() == "Where is <my> order?"


def test_fastapi_app(daemon: InProcessDaemon, smtp_server: SmtpServer, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    app = load("fastapi_app").create_app(
        f"sqlite:///{tmp_path / 'shop.sqlite3'}", str(daemon.settings_path)
    )
    with TestClient(app) as client:
        ada = {"email": "ada@example.com", "name": "Ada"}
        assert client.post("/signup", json=ada).status_code == 201
        again = client.post("/signup", json={**ada, "name": "Again"})
        assert again.status_code == 409  # rolled back: no second welcome
        assert client.post("/contact", json={"message": "Hello"}).status_code == 201

    mail = delivered(daemon, smtp_server, 2)
    assert set(mail) == {"Welcome to Example, Ada!", "Contact form"}
    assert mail["Contact form"].message.get_content().strip() == "Hello"


@pytest.mark.usefixtures("django_project")
def test_django_project(daemon: InProcessDaemon, smtp_server: SmtpServer) -> None:
    from django.test import Client, override_settings

    with override_settings(DISPATCHER_SETTINGS=str(daemon.settings_path)):
        client = Client()
        signup = client.post("/signup", {"email": "bob@example.com", "name": "Bob"})
        assert signup.status_code == 201
        assert client.post("/contact", {"message": "Hi there"}).status_code == 200
        import dispatcher.django

        backend_client = dispatcher.django.client()
        assert backend_client.flush(10)
        backend_client.close()
    mail = delivered(daemon, smtp_server, 2)
    assert mail["Welcome to Example, Bob!"].rcpt_tos == ("bob@example.com",)
    assert mail["Contact form"].envelope_from == "shop@example.com"
