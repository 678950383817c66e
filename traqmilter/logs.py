"""The event log: where log lines go (stderr or syslog, text or JSON) and the escaping every
value from the network goes through before it reaches a line.

Decision lines follow Postfix's own shape so that the tools administrators already use
(grep, pflogsumm-style scripts) find them:

    NOQUEUE: policyd: reject: RCPT from unknown[203.0.113.5]: 550 5.1.1 <zed@example.com>:
    Recipient address rejected: User unknown; from=<s@x> to=<zed@example.com> proto=ESMTP
    helo=<h> rule=unknown_reject

(one line). A decision record also carries its fields as `record.event` (a dict), which the
JSON format writes as separate keys.

SECURITY: senders, recipients, HELO names and client names come from the network. Every
one goes through log_value(): no control character (CR, LF, NUL, ESC ...) reaches a line,
and the characters that delimit values in our lines (`<`, `>`, `"`, `\\`) are escaped, so a
crafted address cannot forge a second line or a field. No exception text is logged with a
decision.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from traqmilter.core.engine import FORWARD_TARGET_MISSING
from traqmilter.core.settings import LogSettings

if TYPE_CHECKING:
    from policyd.codec import PolicyRequest
    from traqmilter.core.attack import Block
    from traqmilter.core.engine import RcptDecision

SYSLOG_SOCKET = "/dev/log"
MAX_LOGGED_VALUE = 512  # characters of one value; Postfix's own lines are bounded too

# Printable ASCII except the delimiters of our lines and the escape character itself.
_UNSAFE = re.compile(r'[^\x20-\x7e]|[\\"<>]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def log_value(value: str) -> str:
    """A value from the network, safe inside one log line: every character outside
    printable ASCII, and `\\ " < >`, as a \\xNN / \\uNNNN escape; cut at MAX_LOGGED_VALUE."""
    if len(value) > MAX_LOGGED_VALUE:
        value = value[:MAX_LOGGED_VALUE] + "..."
    return _UNSAFE.sub(_escape, value)


def client_text(name: str, address: str) -> str:
    """Postfix's `name[address]`, with `unknown` for a client without a name."""
    return f"{log_value(name) or 'unknown'}[{log_value(address)}]"


# --- policyd's lines


def policyd_decision(
    logger: logging.Logger, request: PolicyRequest, decision: RcptDecision
) -> None:
    """Log one RCPT decision: a refusal at INFO, no objection (DUNNO) only at DEBUG (the
    hot path: the line is not even built unless DEBUG is on)."""
    reply = decision.reply
    if reply is None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        action = "dunno"
        level = logging.DEBUG
    else:
        action = "reject" if reply.permanent else "defer"
        level = logging.INFO
        if decision.rule == FORWARD_TARGET_MISSING:
            forward_target_missing(logger, decision)
        if not logger.isEnabledFor(level):
            return
    attributes = request.attributes  # built once: most of these are not extracted
    queue_id = log_value(attributes.get("queue_id", "")) or "NOQUEUE"
    sender = log_value(attributes.get("sender", ""))
    recipient = log_value(attributes.get("recipient", ""))
    client = client_text(attributes.get("client_name", ""), attributes.get("client_address", ""))
    reply_text = ""
    if reply is not None:
        reply_text = f" {reply.code} {reply.enhanced_code} <{recipient}>: "
        reply_text += f"Recipient address rejected: {reply.text};"
    proto = log_value(attributes.get("protocol_name", ""))
    helo = log_value(attributes.get("helo_name", ""))
    logger.log(
        level,
        "%s: policyd: %s: RCPT from %s:%s from=<%s> to=<%s> proto=%s helo=<%s> rule=%s",
        queue_id,
        action,
        client,
        reply_text,
        sender,
        recipient,
        proto,
        helo,
        decision.rule,
        extra={
            "event": {
                "queue_id": queue_id,
                "action": action,
                "rule": decision.rule,
                "from": sender,
                "to": recipient,
                "new": "",
                "client": client,
            }
        },
    )


def forward_target_missing(logger: logging.Logger, decision: RcptDecision) -> None:
    """The warning beside a recipient deferred because its catch-all target does not exist
    (engine rule forward_target_missing): the administrator must act, mail is waiting."""
    address, policy = decision.recipient, decision.policy
    assert address is not None and policy is not None
    logger.warning(
        "warning: forward target <%s> of <%s> does not exist: unknown recipients there are "
        "deferred (451 4.3.0) until it does (traqmilter mailbox add, or change forward_to)",
        log_value(policy.forward_address(address.domain)),
        log_value(address.full_key),
    )


def policyd_block(logger: logging.Logger, block: Block) -> None:
    """The line for a dictionary-attack block that starts now."""
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(block.until))
    logger.info(
        "policyd: block: client=%s attempts=%d until=%s",
        log_value(block.client),
        block.attempts,
        until,
        extra={"event": {"action": "block", "client": log_value(block.client)}},
    )


# --- where the lines go


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, daemon, level, message, and a decision's fields."""

    def __init__(self, daemon: str) -> None:
        super().__init__()
        self.daemon = daemon

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "daemon": self.daemon,
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, Mapping):
            entry.update(event)
        # No traceback: a traceback holds exception text, which may echo input.
        return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    """`name: message`, without the traceback that logging.exception would append (a log
    line never carries exception text; the exception's type is kept), except at level debug."""

    def __init__(self, fmt: str, *, tracebacks: bool) -> None:
        super().__init__(fmt)
        self.tracebacks = tracebacks  # at level debug only: a traceback may echo input

    def formatException(self, ei: Any) -> str:
        if self.tracebacks:
            return super().formatException(ei)
        exc_type = ei[0]
        return f"(exception: {exc_type.__name__})" if exc_type is not None else ""

    def formatStack(self, stack_info: str) -> str:
        return super().formatStack(stack_info) if self.tracebacks else ""


def configure_logging(
    settings: LogSettings, daemon_name: str, *, verbose: bool = False
) -> logging.Handler:
    """Send the root logger's records where `log:` says; returns the handler in use."""
    debug = verbose or settings.level == "debug"
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler | None = None
    warning = ""
    if settings.destination == "syslog":
        syslog = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET,
            facility=logging.handlers.SysLogHandler.facility_names[settings.syslog_facility],
        )
        # It swallows a failed connect (and retries on every line): check it connected.
        if getattr(syslog, "socket", None) is None or not os.path.exists(SYSLOG_SOCKET):
            syslog.close()
            warning = f"cannot log to {SYSLOG_SOCKET}; logging to stderr"
        else:
            handler = syslog
            if settings.format == "json":
                syslog.ident = f"traqmilter/{daemon_name}: "
    if handler is not None:
        prefix = f"traqmilter/{daemon_name}[%(process)d]: "
        formatter: logging.Formatter = (
            JsonFormatter(daemon_name)
            if settings.format == "json"
            else _TextFormatter(prefix + "%(message)s", tracebacks=debug)
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        formatter = (
            JsonFormatter(daemon_name)
            if settings.format == "json"
            else _TextFormatter("%(name)s: %(message)s", tracebacks=debug)
        )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    if warning:
        logging.getLogger("traqmilter").warning("%s", warning)
    return handler


def preserved_log_files() -> list[int]:
    """File descriptors of the root logger's handlers, kept open when the daemon detaches
    (python-daemon closes every other descriptor)."""
    fds: list[int] = []
    for handler in logging.getLogger().handlers:
        sock = getattr(handler, "socket", None)  # SysLogHandler's, once connected
        if isinstance(handler, logging.handlers.SysLogHandler) and sock is not None:
            fds.append(sock.fileno())
    return fds
