"""Reading main.cf values as Postfix does: list splitting, proxy:, how a table is followed."""

from __future__ import annotations

import pytest

from traqmilter.core.postfix_conf import (
    TableAccess,
    classify_table,
    is_table,
    query_keys,
    split_list,
)


def test_lists_split_on_space_and_commas_but_not_inside_braces() -> None:
    assert split_list("example.org, localhost\t$x ,, a") == ["example.org", "localhost", "$x", "a"]
    assert split_list("inline:{ a@x.org=b, { c@x.org = d } } hash:/t") == [
        "inline:{ a@x.org=b, { c@x.org = d } }",
        "hash:/t",
    ]
    assert split_list("") == []


@pytest.mark.parametrize(
    ("spec", "table", "access"),
    [
        ("proxy:unix:passwd.byname", "unix:passwd.byname", TableAccess.PASSWD),
        ("proxy:lmdb:/etc/postfix/v", "lmdb:/etc/postfix/v", TableAccess.LISTED),
        ("hash:/etc/aliases", "hash:/etc/aliases", TableAccess.LISTED),
        ("texthash:/t", "texthash:/t", TableAccess.LISTED),
        ("inline:{a=b}", "inline:{a=b}", TableAccess.LISTED),
        ("static:x", "static:x", TableAccess.STATIC),
        ("regexp:/t.re", "regexp:/t.re", TableAccess.ASKED),
        ("proxy:ldap:/etc/postfix/ldap.cf", "ldap:/etc/postfix/ldap.cf", TableAccess.ASKED),
        ("mysql:/m.cf", "mysql:/m.cf", TableAccess.ASKED),
        ("socketmap:inet:127.0.0.1:9:x", "socketmap:inet:127.0.0.1:9:x", TableAccess.ASKED),
    ],
)
def test_each_table_is_followed_the_way_it_can_be(
    spec: str, table: str, access: TableAccess
) -> None:
    classified = classify_table("virtual_alias_maps", spec)
    assert (classified.table, classified.access) == (table, access)


def test_domain_list_elements() -> None:
    assert is_table("hash:/etc/postfix/domains")
    assert not is_table("example.org") and not is_table("/etc/postfix/domains")


def test_asked_keys_follow_postfix_lookup_order() -> None:
    assert query_keys("u@l.example", local=True, map_type="ldap") == (
        "u@l.example",
        "u",
        "@l.example",
    )
    assert query_keys("u@v.example", local=False, map_type="mysql") == ("u@v.example", "@v.example")
    assert query_keys("u@v.example", local=True, map_type="regexp") == ("u@v.example",)
