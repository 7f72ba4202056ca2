"""The example Django project (examples/django_project), set up once per test run: Django can be
configured only once in a process, so every Django test uses this one, with an in-memory test
database, and changes settings per test with `override_settings`."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "django_project"


@pytest.fixture(scope="session")
def django_project() -> Iterator[Path]:
    """Django configured with the example's settings and a migrated test database."""
    import django
    from django.db import connection

    sys.path.insert(0, str(EXAMPLE))
    os.environ["DJANGO_SETTINGS_MODULE"] = "shop.settings"
    django.setup()
    # Not setup_test_environment(): it would swap EMAIL_BACKEND for Django's locmem backend.
    name = connection.creation.create_test_db(verbosity=0, serialize=False)
    yield EXAMPLE
    connection.creation.destroy_test_db(name, verbosity=0)
    sys.path.remove(str(EXAMPLE))
