"""`dispatcher.sqlalchemy.enqueue_after_commit`: mail only for what a session committed."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import dispatcher
from dispatcher.errors import InvalidRequest
from dispatcher.sqlalchemy import enqueue_after_commit
from dispatcher.testing import Outbox, capture
from tests.daemon import write_settings

CONTEXT = {"name": "Ada", "activate_url": "https://example.com/a"}


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.sqlite3'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session
    engine.dispose()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    dispatcher.configure(write_settings(tmp_path, smtp_port=9))
    with capture() as captured:
        yield captured
    dispatcher.client.close()


def test_mail_goes_when_the_session_commits(session: Session, outbox: Outbox) -> None:
    session.add(User(email="ada@example.com"))
    request_id = enqueue_after_commit(session, "welcome", to="ada@example.com", context=CONTEXT)
    enqueue_after_commit(session, to="ops@example.com", subject="New user", text="ada")
    assert list(outbox) == []
    session.commit()
    assert [m.subject for m in outbox] == ["Welcome to Example, Ada!", "New user"]
    assert outbox[0].id == request_id
    session.commit()  # nothing is sent twice
    assert len(outbox) == 2


def test_mail_is_dropped_when_the_session_rolls_back(session: Session, outbox: Outbox) -> None:
    with pytest.raises(RuntimeError), session.begin():
        session.add(User(email="ada@example.com"))
        enqueue_after_commit(session, "welcome", to="ada@example.com", context=CONTEXT)
        raise RuntimeError("the signup failed")
    with session.begin():
        enqueue_after_commit(session, to="a@example.com", subject="Kept", text="t")
        with pytest.raises(RuntimeError), session.begin_nested():
            enqueue_after_commit(session, to="a@example.com", subject="Savepoint", text="t")
            raise RuntimeError
        with session.begin_nested():  # released: waits for the outer commit
            enqueue_after_commit(session, to="a@example.com", subject="Released", text="t")
        assert list(outbox) == []
    assert [m.subject for m in outbox] == ["Kept", "Released"]


def test_a_bad_request_fails_at_once_and_outside_a_transaction_mail_goes_at_once(
    session: Session, outbox: Outbox
) -> None:
    with pytest.raises(InvalidRequest, match="at least one recipient"):
        enqueue_after_commit(session, "welcome", to=[], context=CONTEXT)
    enqueue_after_commit(session, to="a@example.com", subject="Now", text="t")
    assert [m.subject for m in outbox] == ["Now"]
