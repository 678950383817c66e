"""What a Postfix main.cf says about local domains and recipients (pure; no I/O).

`directory.postfix: auto` reads the parameters below with `postconf -hx` (values with
$name expanded) and hands them here. This module splits Postfix's lists, takes the
table specs apart and says how each table can be followed; traqmilter.directory.postfix
then reads the tables. The rules are Postfix's own (postconf(5), ADDRESS_CLASS_README):

- mydestination: the local domains; their recipients are in local_recipient_maps,
  whose keys are bare local parts ("user") or full addresses. An empty
  local_recipient_maps means Postfix accepts every local recipient.
- virtual_mailbox_domains: recipients in virtual_mailbox_maps (keys "user@domain",
  "@domain" for the whole domain).
- virtual_alias_domains: recipients in virtual_alias_maps. virtual_alias_maps also
  applies to every other class, so it is asked for all served domains.
- relay_domains: mail Postfix relays to another server; their recipients are not known
  here (relay_recipient_maps names the other server's), so a relay domain is never
  served as local: it may only be given action outbox, explicitly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DOMAIN_PARAMETERS = (
    "mydestination",
    "virtual_mailbox_domains",
    "virtual_alias_domains",
    "relay_domains",
)
TABLE_PARAMETERS = ("local_recipient_maps", "virtual_mailbox_maps", "virtual_alias_maps")
PARAMETERS = DOMAIN_PARAMETERS + TABLE_PARAMETERS

# Tables whose keys `postmap -s` lists (the types traqmilter.directory.maps follows).
LISTABLE_TYPES = frozenset({"hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash", "inline"})
# Tables Postfix matches against the whole address only (no user, no @domain lookups).
PATTERN_TYPES = frozenset({"regexp", "pcre"})
# Postfix's local user table: the password database, read through the C library.
PASSWD_TABLE = "unix:passwd.byname"


class TableAccess(enum.StrEnum):
    """How traqmilter follows one recipient table."""

    LISTED = "listed"  # keys listed with postmap -s, re-read when the file changes
    PASSWD = "passwd"  # unix:passwd.byname: the user names of the password database
    STATIC = "static"  # static:VALUE finds every key: the whole class is known
    ASKED = "asked"  # cannot be listed: each address asked with postmap -q


@dataclass(frozen=True, slots=True)
class TableSpec:
    parameter: str  # the main.cf parameter that named it
    spec: str  # as written, proxy: included
    table: str  # proxy: removed: what traqmilter reads
    access: TableAccess

    @property
    def map_type(self) -> str:
        return self.table.partition(":")[0]


def split_list(value: str) -> list[str]:
    """A Postfix list value split as Postfix splits it: on white space and commas, except
    inside {braces} (inline:{ a=b, c=d } is one element)."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        elif depth == 0 and (char.isspace() or char == ","):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        items.append("".join(current))
    return items


def strip_proxy(spec: str) -> str:
    """The table proxymap(8) opens for `proxy:TYPE:NAME`: traqmilter reads it directly."""
    while spec.startswith("proxy:"):
        spec = spec[len("proxy:") :]
    return spec


def is_table(item: str) -> bool:
    """Whether a list element is a TYPE:NAME table (not a domain name or a /file)."""
    map_type, colon, _ = item.partition(":")
    return bool(colon) and not item.startswith("/") and map_type.replace("_", "").isalnum()


def classify_table(parameter: str, spec: str) -> TableSpec:
    table = strip_proxy(spec)
    map_type = table.partition(":")[0]
    if table == PASSWD_TABLE:
        access = TableAccess.PASSWD
    elif map_type == "static":
        access = TableAccess.STATIC
    elif map_type in LISTABLE_TYPES:
        access = TableAccess.LISTED
    else:  # regexp, pcre, ldap, mysql, pgsql, sqlite, tcp, socketmap, ...: no listing
        access = TableAccess.ASKED
    return TableSpec(parameter, spec, table, access)


def recipient_tables(values: dict[str, str]) -> list[TableSpec]:
    """Every table of the recipient parameters, in the order Postfix consults them."""
    return [
        classify_table(parameter, item)
        for parameter in TABLE_PARAMETERS
        for item in split_list(values.get(parameter, ""))
    ]


def query_keys(address_key: str, *, local: bool, map_type: str) -> tuple[str, ...]:
    """The keys Postfix looks up for user@domain in a table it cannot list, in its order:
    the address, the bare local part (only for local domains) and @domain. Pattern tables
    (regexp, pcre) are asked the full address only, as Postfix asks them."""
    local_part, at, domain = address_key.rpartition("@")
    if not at or map_type in PATTERN_TYPES:
        return (address_key,)
    if local:
        return (address_key, local_part, "@" + domain)
    return (address_key, "@" + domain)
