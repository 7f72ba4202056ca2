"""Templates are read only from inside `templates.dir`: a symlink out of it (a template folder,
a body file, a layout, preview.yaml) is refused by `check`, the renderer and the preview; a link
that stays inside keeps working. The outside folder is always under tmp_path."""

from pathlib import Path

import pytest

from dispatcher.errors import TemplateError
from dispatcher.render import Renderer
from tests.daemon import run_cli
from tests.ui import InProcessPreview, preview_settings

OUTSIDE = "points outside the templates folder"
SECRET = "top secret line"


def outside_template(tmp_path: Path) -> Path:
    """A complete template folder outside any templates folder, with a recognisable body."""
    folder = tmp_path / "elsewhere" / "secret"
    folder.mkdir(parents=True)
    (folder / "subject.txt").write_text("Secret\n")
    (folder / "body.txt").write_text(f"{SECRET}\n")
    (folder / "preview.yaml").write_text("default: {}\n")
    return folder


@pytest.fixture
def settings(tmp_path: Path) -> Path:
    return preview_settings(tmp_path)


def renderer(tmp_path: Path) -> Renderer:
    return Renderer(tmp_path / "templates", "Example <noreply@example.com>")


def test_check_refuses_a_template_folder_linked_outside(tmp_path: Path, settings: Path) -> None:
    (tmp_path / "templates" / "secret").symlink_to(outside_template(tmp_path))
    result = run_cli("check", settings=settings)
    assert result.returncode != 0
    assert f"templates/secret: {OUTSIDE}" in result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_render_refuses_a_folder_a_body_or_a_layout_linked_outside(tmp_path: Path) -> None:
    outside = outside_template(tmp_path)
    preview_settings(tmp_path)
    templates = tmp_path / "templates"
    (templates / "secret").symlink_to(outside)
    with pytest.raises(TemplateError, match=f"templates/secret: {OUTSIDE}"):
        renderer(tmp_path).render_example("secret", {})
    (templates / "notice" / "body.txt").unlink()
    (templates / "notice" / "body.txt").symlink_to(outside / "body.txt")
    with pytest.raises(TemplateError, match=f"templates/notice/body.txt: {OUTSIDE}"):
        renderer(tmp_path).render_example("notice", {})
    layouts = tmp_path / "elsewhere" / "_layouts"
    (templates / "_layouts").rename(layouts)
    (templates / "_layouts").symlink_to(layouts)
    paid = renderer(tmp_path).samples("invoice")["paid"]
    with pytest.raises(TemplateError, match=f"templates/_layouts/plain.html: {OUTSIDE}"):
        renderer(tmp_path).render_example("invoice", paid)


def test_samples_linked_outside_are_refused(tmp_path: Path) -> None:
    outside = outside_template(tmp_path)
    preview_settings(tmp_path)
    samples = tmp_path / "templates" / "invoice" / "preview.yaml"
    samples.unlink()
    samples.symlink_to(outside / "preview.yaml")
    with pytest.raises(TemplateError, match=f"templates/invoice/preview.yaml: {OUTSIDE}"):
        renderer(tmp_path).samples("invoice")


def test_preview_shows_the_refusal_and_not_the_file(
    preview: InProcessPreview, tmp_path: Path
) -> None:
    (tmp_path / "templates" / "secret").symlink_to(outside_template(tmp_path))
    for path in ("/", "/templates/secret", "/templates/secret/default"):
        page = preview.get(path)
        assert f"templates/secret: {OUTSIDE}" in page.text, path
        assert SECRET not in page.text and "body.txt" not in page.text.split("<main>")[1]


def test_a_link_that_stays_inside_keeps_working(tmp_path: Path, settings: Path) -> None:
    templates = tmp_path / "templates"
    (templates / "bill").symlink_to(templates / "invoice")
    (templates / "notice" / "body.txt").rename(templates / "notice.txt")
    (templates / "notice" / "body.txt").symlink_to(Path("..") / "notice.txt")
    result = run_cli("check", settings=settings)
    assert result.returncode == 0, result.stdout + result.stderr
    paid = renderer(tmp_path).samples("bill")["paid"]
    assert "Invoice A-17" in renderer(tmp_path).render_example("bill", paid).data.decode()
    assert b"22:00" in renderer(tmp_path).render_example("notice", {}).data
