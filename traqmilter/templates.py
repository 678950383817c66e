"""Reading bounce templates: the file a domain's bounce_template names, or the shipped one.

An adapter (floor of the effects): the milter reads a template to build a DSN, start-up
checks read it to validate it; core.template renders it.

SECURITY: at most MAX_TEMPLATE_BYTES are read from the path the configuration names;
anything longer is refused, not cut.
"""

from __future__ import annotations

import importlib.resources

from traqmilter.core.template import MAX_TEMPLATE_SOURCE_CHARS, TemplateError

MAX_TEMPLATE_BYTES = MAX_TEMPLATE_SOURCE_CHARS * 4  # UTF-8 of the longest template allowed


def read_template(path: str) -> str:
    """The bounce template at path ("" for the shipped one), bounded. Raises OSError,
    UnicodeDecodeError, or TemplateError when it is too long."""
    if not path:
        resource = importlib.resources.files("traqmilter") / "data" / "bounce.txt.j2"
        return resource.read_text(encoding="utf-8")
    with open(path, "rb") as handle:
        data = handle.read(MAX_TEMPLATE_BYTES + 1)
    if len(data) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"bounce template {path} is too long")
    return data.decode("utf-8")
