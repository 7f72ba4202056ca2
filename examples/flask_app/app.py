"""A minimal Flask app that queues mail with the dispatcher: a template and a plain message.

pip install -e '../..[bench]'        # or just flask
dispatcher dev --settings ../django_project/dispatcher.yaml &
DISPATCHER_SETTINGS=../django_project/dispatcher.yaml flask --app app run
curl -d email=ada@example.com -d name=Ada localhost:5000/signup
"""

import os

from flask import Flask, request
from markupsafe import escape

import dispatcher


def create_app(settings_path: str | None = None) -> Flask:
    """The app; the dispatcher's settings from `settings_path`, else DISPATCHER_SETTINGS."""
    dispatcher.configure(settings_path or os.environ.get("DISPATCHER_SETTINGS"))
    app = Flask(__name__)

    @app.post("/signup")
    def signup() -> tuple[dict[str, str], int]:
        """Queue the `welcome` template: returns at once, whether or not the daemon is up."""
        email, name = request.form.get("email", ""), request.form.get("name", "")
        if not email or not name:
            return {"error": "email and name are required"}, 400
        try:
            request_id = dispatcher.enqueue_email(
                "welcome",
                to=email,
                context={"name": name, "activate_url": f"https://example.com/activate/{email}"},
            )
        except ValueError as exc:  # InvalidRequest: an address that can never be mailed
            return {"error": str(exc)}, 400
        return {"queued": request_id}, 201

    @app.post("/contact")
    def contact() -> tuple[dict[str, str], int]:
        """Queue a mail without a template: the parts themselves."""
        message = request.form.get("message", "")
        request_id = dispatcher.enqueue_message(
            to="support@example.com",
            subject="Contact form",
            html=f"<p>{escape(message)}</p>",  # the text part is derived from the HTML
        )
        return {"queued": request_id}, 201

    return app
