"""Reading bounce templates: the shipped one, a file, and one too long to be a template."""

from pathlib import Path

import pytest

from traqmilter.core.template import TemplateError, validate_template
from traqmilter.templates import MAX_TEMPLATE_BYTES, read_template


def test_shipped_template_is_read_and_valid() -> None:
    source = read_template("")
    assert "{{" in source
    validate_template(source)


def test_template_file_is_read_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bounce.txt.j2"
    path.write_text("Grüße an {{ sender }}\n", encoding="utf-8")
    assert read_template(str(path)) == "Grüße an {{ sender }}\n"


def test_too_long_a_template_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.j2"
    path.write_bytes(b"x" * (MAX_TEMPLATE_BYTES + 1))
    with pytest.raises(TemplateError, match="too long"):
        read_template(str(path))


def test_missing_or_undecodable_template_is_an_os_or_unicode_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_template(str(tmp_path / "absent.j2"))
    bad = tmp_path / "latin1.j2"
    bad.write_bytes("Gr\xfc\xdfe\n".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):
        read_template(str(bad))
