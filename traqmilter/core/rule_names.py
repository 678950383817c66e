"""The names of the decision rules: RCPT time (engine.RCPT_RULES and what their outcomes
decide) and end of message (plan.MESSAGE_RULES).

A name is what a decision carries as its `rule`, what the log line shows (rule=...) and
what the metrics label: one constant each, compared by identity, never a string spelled
again in another module. They are str values, so logs, JSON and metrics read them as
their words.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from traqmilter.core.settings import Action


class RuleName(enum.StrEnum):
    # RCPT time: the rules of engine.RCPT_RULES, in order ...
    NO_RECIPIENT = "no_recipient"
    BAD_ADDRESS = "bad_address"
    NOT_LOCAL = "not_local"
    POSTMASTER = "postmaster"
    BARE_LOCAL_PART = "bare_local_part"
    QUEUE_FULL = "queue_full"
    CLIENT_BLOCKED = "client_blocked"
    KNOWN = "known"
    UNKNOWN_NULL_SENDER = "unknown_null_sender"
    UNKNOWN = "unknown"
    # ... and what the last one decides: the domain's action, or why it cannot apply
    UNKNOWN_REJECT = "unknown_reject"
    UNKNOWN_BOUNCE = "unknown_bounce"
    UNKNOWN_FORWARD = "unknown_forward"
    UNKNOWN_READDRESS = "unknown_readdress"
    UNKNOWN_CREATE = "unknown_create"
    UNKNOWN_OUTBOX = "unknown_outbox"
    UNKNOWN_HIGH_WATER = "unknown_high_water"
    # bounce to a sender of a local domain that does not exist here: its DSN would be refused
    UNKNOWN_BOUNCE_SENDER_UNKNOWN = "unknown_bounce_sender_unknown"
    FORWARD_TARGET_MISSING = "forward_target_missing"
    # bounce with bounce_to: verified (core.verify): what verified the sender at RCPT time,
    # that it is not verified (refused there), or that the header decides at end of message
    UNKNOWN_BOUNCE_TRUSTED_CLIENT = "unknown_bounce_trusted_client"
    UNKNOWN_BOUNCE_SPF_PASS = "unknown_bounce_spf_pass"
    UNKNOWN_BOUNCE_UNVERIFIED = "unknown_bounce_unverified"
    UNKNOWN_BOUNCE_VERIFY_AT_EOM = "unknown_bounce_verify_at_eom"
    LOOKUP_FAILED = "lookup_failed"  # the directory could not answer
    # The milter's rule over the transaction so far (core.plan.transaction_split): a
    # recipient whose fate end of message decides alone, or one beside such recipients,
    # is deferred (452 4.5.3) to a transaction of its own kind
    SEPARATE_TRANSACTION = "separate_transaction"
    # End of message: the rules of plan.MESSAGE_RULES, in order
    NO_ACTION = "no_action"
    LOOP = "loop"
    HIGH_WATER = "high_water"
    UNVERIFIED = "unverified"
    DSN_RATE = "dsn_rate"
    CREATE_REFUSED = "create_refused"
    ACTIONS = "actions"
    # ... and, within `actions`, the fate of a bounce whose sender was judged only then
    AUTHRES_SPF_PASS = "authres_spf_pass"
    AUTHRES_DKIM_PASS = "authres_dkim_pass"
    UNVERIFIED_DISCARD = "unverified_discard"


UNKNOWN_ACTION: Mapping[Action, RuleName] = {
    action: RuleName(f"unknown_{action.value}") for action in Action
}
"""The rule of an unknown recipient whose domain's action applies."""
