"""`enqueue_after_commit(session, ...)`: mail that goes only if the session's transaction commits.

    with Session(engine) as session, session.begin():
        session.add(user)
        enqueue_after_commit(session, "welcome", to=user.email, context={"name": user.name})
    # committed: handed over now; rolled back: never

The request is made and checked at once (a bad one raises in the caller), and kept in
`session.info` until the session commits. A rollback drops what was asked for since the
transaction (or the savepoint) that rolled back began. Outside a transaction it goes at once.
"""

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from dispatcher.deferred import Deferred, defer

_PENDING = "dispatcher.pending"  # session.info key: [(transaction, request), ...]


def enqueue_after_commit(session: Session, template: str | None = None, /, **options: Any) -> str:
    """`enqueue_email(template, ...)`, or without a template `enqueue_message(...)` (or with
    `raw=` a built message, as `enqueue_raw()`), handed over when `session` commits.

    Returns the request id at once; raises `InvalidRequest` at once for what can never be sent.
    """
    request = defer(template, options)
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        return request.send()
    if _PENDING not in session.info:
        event.listen(session, "after_commit", _send_pending)
        event.listen(session, "after_soft_rollback", _drop_rolled_back)
    session.info.setdefault(_PENDING, []).append((transaction, request))
    return request.id


def _send_pending(session: Session) -> None:
    """The outermost transaction committed: every request waiting in the session goes.
    (A savepoint's release is a commit too, to SQLAlchemy: its requests wait on.)"""
    if session.in_nested_transaction():
        return
    pending: list[tuple[SessionTransaction, Deferred]] = session.info.get(_PENDING, [])
    session.info[_PENDING] = []
    for _, request in pending:
        request.send()


def _drop_rolled_back(session: Session, rolled_back: SessionTransaction) -> None:
    """Forget the requests of `rolled_back` and of the savepoints inside it."""
    pending = session.info.get(_PENDING, [])
    session.info[_PENDING] = [
        (transaction, request)
        for transaction, request in pending
        if not _within(transaction, rolled_back)
    ]


def _within(transaction: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False
