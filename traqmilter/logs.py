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
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from traqmilter.core.address import bare_address
from traqmilter.core.replies import Reply
from traqmilter.core.settings import LogSettings

if TYPE_CHECKING:
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


# --- decision lines, both front ends


def refusal_action(reply: Reply | None) -> str:
    """The action word of a decision line: Postfix's reject/defer, or dunno (no objection)."""
    if reply is None:
        return "dunno"
    return "reject" if reply.permanent else "defer"


def decision(
    logger: logging.Logger,
    front: str,
    action: str,
    *,
    queue_id: str,
    client_name: str,
    client_address: str,
    sender: str,
    recipients: Sequence[str],
    rule: str,
    stage: str = "",
    reply: Reply | None = None,
    new: str = "",
    proto: str | None = None,
    helo: str = "",
    level: int = logging.INFO,
) -> None:
    """Log one decision, the line in Postfix's shape, its fields as `record.event`.

    With a stage ("RCPT", "END-OF-MESSAGE") it is a refusal or no-objection line:
        QID: FRONT: ACTION: STAGE from CLIENT: REPLY; from=<S> to=<R>[ proto=P helo=<H>] rule=N
    (a reply at RCPT worded as Postfix words a recipient rejection, Reply.rcpt_text);
    without one it is a recipient's fate at end of message:
        QID: FRONT: ACTION: from=<S> to=<R>[ new=<N>] client=CLIENT rule=N
    Every value is raw as the MTA gave it (addresses with or without angle brackets) and
    escaped here. Nothing is built unless `level` is enabled (policyd's hot path).
    """
    if not logger.isEnabledFor(level):
        return
    qid = log_value(queue_id) or "NOQUEUE"
    client = client_text(client_name, client_address)
    sender_text = log_value(bare_address(sender))
    shown = [log_value(bare_address(r)) for r in recipients]
    to = ",".join(f"<{r}>" for r in shown)
    new_text = log_value(bare_address(new)) if new else ""
    if stage:
        said = ""
        if reply is not None:
            text = reply.rcpt_text(shown[0]) if stage == "RCPT" and shown else reply.text
            said = f" {reply.code} {reply.enhanced_code} {text};"
        more = f" proto={log_value(proto)} helo=<{log_value(helo)}>" if proto is not None else ""
        message = f"{qid}: {front}: {action}: {stage} from {client}:{said} from=<{sender_text}>"
        message += f" to={to}{more} rule={rule}"
    else:
        shown_new = f" new=<{new_text}>" if new else ""
        message = f"{qid}: {front}: {action}: from=<{sender_text}> to={to}{shown_new}"
        message += f" client={client} rule={rule}"
    event = {
        "queue_id": qid,
        "action": action,
        "rule": rule,
        "from": sender_text,
        "to": ",".join(shown),
        "new": new_text,
        "client": client,
    }
    logger.log(level, "%s", message, extra={"event": event})


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
