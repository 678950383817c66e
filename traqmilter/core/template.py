"""The bounce template: the administrator's Jinja2 text of a DSN's human part, in a sandbox.

Pure: the caller passes the template source (traqmilter.templates reads it from disk). Used
by core.dsn to render a DSN and by start-up checks (validate_template) so that a template
that cannot render stops the milter's start instead of tempfailing every bounce.

SECURITY: the template runs in Jinja2's immutable sandbox with StrictUndefined and no
globals; extends/include/import and private attributes are refused before it runs; values
are passed as data and never evaluated, so a Subject of "{{7*7}}" renders as "{{7*7}}".
Problems (syntax, unknown variables, private attributes, runtime failures, output over
MAX_RENDERED_OCTETS) raise TemplateError, whose text is safe for a log line.

BUGS: the sandbox keeps a template away from Python internals and the output is capped, but
a template can still be written to burn CPU or memory before it produces output (nested
loops, "x" * 10**9): the template is configuration, trusted like the YAML file.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from types import TracebackType

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_SOURCE_CHARS = 64 * 1024
MAX_RENDERED_OCTETS = 64 * 1024
UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, escapes, line breaks

TEMPLATE_VARIABLES = frozenset(
    {
        "recipients",
        "sender",
        "original_subject",
        "arrival_date",
        "reporting_mta",
        "queue_id",
        "postmaster",
        "full_message_returned",
    }
)


class TemplateError(ValueError):
    """The bounce template is unusable: syntax, forbidden construct, or a render failure."""


def _new_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    env.globals.clear()  # no range/lipsum/cycler/joiner/namespace/dict: only our facts
    return env


_ENVIRONMENT = _new_environment()


def validate_template(template_source: str) -> None:
    """Raise TemplateError unless the template compiles, uses only the offered variables,
    reaches for no private attribute, and renders sample facts to a usable text."""
    template = compile_template(template_source)
    for full_message_returned in (False, True):
        sample = dict(_SAMPLE_VARIABLES, full_message_returned=full_message_returned)
        _split_subject(_render(template, sample))


_SAMPLE_VARIABLES: Mapping[str, object] = {
    "recipients": ("no-such-user@example.com", "jörg@example.com"),
    "sender": "sender@example.org",
    "original_subject": "Grüße {{7*7}} %s",
    "arrival_date": "Mon, 24 Nov 2025 16:54:00 +0000",
    "reporting_mta": "mx.example.com",
    "queue_id": "4ZxQ1s2Lz9",
    "postmaster": "MAILER-DAEMON@mx.example.com",
}


@functools.lru_cache(maxsize=16)
def compile_template(template_source: str) -> jinja2.Template:
    if len(template_source) > MAX_TEMPLATE_SOURCE_CHARS:
        raise TemplateError(
            f"bounce template is longer than {MAX_TEMPLATE_SOURCE_CHARS} characters"
        )
    try:
        tree = _ENVIRONMENT.parse(template_source)
        _check_tree(tree)
        return _ENVIRONMENT.from_string(template_source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"bounce template line {exc.lineno}: {_safe(exc.message or 'syntax error')}"
        ) from None


def _check_tree(tree: nodes.Template) -> None:
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        raise TemplateError(
            f"bounce template line {node.lineno}: extends, include and import are not available"
        )
    for getattr_node in tree.find_all(nodes.Getattr):
        if getattr_node.attr.startswith("_"):
            raise TemplateError(
                f"bounce template line {getattr_node.lineno}: "
                f"private attribute {getattr_node.attr!r} is not available"
            )
    for getitem_node in tree.find_all(nodes.Getitem):
        key = getitem_node.arg
        if (
            isinstance(key, nodes.Const)
            and isinstance(key.value, str)
            and key.value.startswith("_")
        ):
            raise TemplateError(
                f"bounce template line {getitem_node.lineno}: "
                f"private attribute {key.value!r} is not available"
            )
    unknown = sorted(meta.find_undeclared_variables(tree) - TEMPLATE_VARIABLES)
    if unknown:
        name = unknown[0]
        line = next(
            (n.lineno for n in tree.find_all(nodes.Name) if n.name == name and n.ctx == "load"), 0
        )
        offered = ", ".join(sorted(TEMPLATE_VARIABLES))
        raise TemplateError(
            f"bounce template line {line}: unknown variable {name!r} (offered: {offered})"
        )


def _render(template: jinja2.Template, variables: Mapping[str, object]) -> str:
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**variables):
            size += len(piece.encode("utf-8", "replace"))
            if size > MAX_RENDERED_OCTETS:
                raise TemplateError(
                    f"bounce template renders more than {MAX_RENDERED_OCTETS} octets"
                )
            pieces.append(piece)
    except TemplateError:
        raise
    except Exception as exc:  # a template bug must become a typed error, never a crash
        line = _template_line(exc.__traceback__)
        where = f"line {line}" if line else "rendering"
        raise TemplateError(
            f"bounce template {where}: {type(exc).__name__}: {_safe(str(exc))}"
        ) from exc
    return "".join(pieces)


def _template_line(tb: TracebackType | None) -> int:
    """The template line of the innermost frame Jinja2 attributes to the template."""
    line = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


_SUBJECT_LINE = re.compile(r"subject:[ \t]*(.*)", re.IGNORECASE)


def _split_subject(rendered: str) -> tuple[str, str]:
    """The "Subject:" first-line convention: (subject or "", rest of the text).
    TemplateError when no text is left: a report must explain itself."""
    text = rendered.replace("\r\n", "\n").replace("\r", "\n")
    first, _, rest = text.partition("\n")
    match = _SUBJECT_LINE.fullmatch(first)
    subject = match.group(1) if match else ""
    body = rest if match else text
    if not body.strip():
        raise TemplateError("bounce template renders an empty text")
    return subject, body.removeprefix("\n") if match else body


def render_text(template: jinja2.Template, variables: Mapping[str, object]) -> tuple[str, str]:
    """(subject or "", human text) of a compiled template rendered with these variables."""
    return _split_subject(_render(template, variables))


def _safe(text: str) -> str:
    """Error text safe for a log line: one line, no controls or escapes, bounded."""
    return "".join(
        "?" if unicodedata.category(ch) in UNSAFE_CATEGORIES else ch for ch in text[:300]
    )
