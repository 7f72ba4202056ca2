"""A minimal FastAPI app: users in SQLAlchemy, mail queued only when the user is committed.

    pip install -e '../..[sqlalchemy]' fastapi uvicorn
    dispatcher dev --settings ../django_project/dispatcher.yaml &
    DISPATCHER_SETTINGS=../django_project/dispatcher.yaml uvicorn app:app
    curl -H 'content-type: application/json' -d '{"email": "ada@example.com", "name": "Ada"}' \\
        localhost:8000/signup
"""

import os
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import String, create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import dispatcher
from dispatcher.sqlalchemy import enqueue_after_commit


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(100))


class Signup(BaseModel):
    email: str
    name: str


class Contact(BaseModel):
    message: str


def create_app(
    database_url: str = "sqlite:///shop.sqlite3", settings_path: str | None = None
) -> FastAPI:
    """The app on `database_url`; the dispatcher's settings from `settings_path`, else
    DISPATCHER_SETTINGS."""
    dispatcher.configure(settings_path or os.environ.get("DISPATCHER_SETTINGS"))
    engine = create_engine(database_url)
    Base.metadata.create_all(engine)
    app = FastAPI()

    def session() -> Iterator[Session]:
        with Session(engine) as db:
            yield db

    @app.post("/signup", status_code=201)
    def signup(form: Signup, db: Annotated[Session, Depends(session)]) -> dict[str, str]:
        """Add the user and queue `welcome` in one transaction: a failed insert sends nothing."""
        try:
            with db.begin():
                db.add(User(email=form.email, name=form.name))
                request_id = enqueue_after_commit(
                    db,
                    "welcome",
                    to=form.email,
                    context={"name": form.name, "activate_url": "https://example.com/activate"},
                )
        except ValueError as exc:  # InvalidRequest: an address that can never be mailed
            raise HTTPException(400, str(exc)) from None
        except IntegrityError:  # the commit failed (the user exists): the mail was dropped
            raise HTTPException(409, "already signed up") from None
        return {"queued": request_id}

    @app.post("/contact", status_code=201)
    def contact(form: Contact) -> dict[str, str]:
        """Queue a mail without a template: the parts themselves."""
        request_id = dispatcher.enqueue_message(
            to="support@example.com", subject="Contact form", text=form.message
        )
        return {"queued": request_id}

    return app


if os.environ.get("DISPATCHER_SETTINGS"):
    app = create_app()
