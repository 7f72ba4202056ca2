"""A minimal Django project whose mail goes through the dispatcher (see README.md beside it)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "shop"]
ROOT_URLCONF = "shop.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SHOP_DATABASE", BASE_DIR / "db.sqlite3"),
    }
}
USE_TZ = True

# Every mail Django sends (send_mail, mail_admins, password reset, ...) is queued with the
# dispatcher daemon; inside transaction.atomic() only when the block commits.
EMAIL_BACKEND = "dispatcher.django.EmailBackend"
# The dispatcher's settings file; without it, the DISPATCHER_SETTINGS environment variable
# or ./settings.yaml. This one points at the repository's templates.
DISPATCHER_SETTINGS = os.environ.get("DISPATCHER_SETTINGS", BASE_DIR / "dispatcher.yaml")
# DISPATCHER_ON_COMMIT = False   # hand mail over at once, even inside transaction.atomic()
DEFAULT_FROM_EMAIL = "Shop <shop@example.com>"
SERVER_EMAIL = "alerts@example.com"
ADMINS = [("Ops", "ops@example.com")]
MANAGERS = [("Sales", "sales@example.com")]
