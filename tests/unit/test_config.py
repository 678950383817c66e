"""Config loading: the SPEC example loads; every kind of mistake is refused with path and line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from traqmilter.config import (
    ConfigError,
    embedded_default,
    load_config,
    parse_config,
    settings_problems,
)
from traqmilter.core.settings import Action, BounceSettings, Config

SPEC_EXAMPLE = b"""\
directory:
  sqlite: /var/lib/traqmilter/directory.sqlite
undelivered:                    # default for every local domain
  action: reject
domains:                        # the local domains; each may override
  example.com: {}
  example.org: {action: forward, forward_to: admin}          # local part or full address
  example.net: {action: readdress, readdress_to: example.com}
  shop.example: {action: create, template: default}
  split.example: {action: outbox, outbox_relay: "[mx2.example.com]:25"}
  old.example: {action: bounce, bounce_template: /etc/traqmilter/bounce.txt.j2}
postmaster: postmaster@example.com
dictionary_attack: {threshold: 5, window: 10m, block: 1h, exempt: [127.0.0.0/8, "::1/128"]}
queue: {high_water: 40000}
policyd: {listen: "inet:127.0.0.1:10040"}   # or unix:/path
milter: {listen: "inet:127.0.0.1:8891"}     # or unix:/path
"""


def test_spec_example_loads() -> None:
    config = parse_config(SPEC_EXAMPLE)
    assert config.domains["example.org"].action is Action.FORWARD
    assert config.domains["example.net"].readdress_to == "example.com"
    assert config.domains["split.example"].outbox_relay == "[mx2.example.com]:25"
    assert config.domains["example.com"] == config.undelivered
    assert config.dictionary_attack.window == 600 and config.dictionary_attack.block == 3600
    assert config.postmaster == "postmaster@example.com"


def test_domains_inherit_undelivered_and_are_normalised() -> None:
    config = parse_config(
        b"undelivered: {action: forward, forward_to: catch}\ndomains: {Example.COM.: {}}"
    )
    assert config.domains["example.com"].action is Action.FORWARD
    assert config.domains["example.com"].forward_to == "catch"


@pytest.mark.parametrize("text", [b"", b"# only a comment\n"])
def test_empty_file_is_the_default(text: bytes) -> None:
    assert parse_config(text) == embedded_default()
    # ... which serves what the host's Postfix knows: the declared defaults but for these.
    assert (
        dataclasses.replace(
            embedded_default(),
            auto_domains=False,
            directory=dataclasses.replace(embedded_default().directory, postfix=""),
        )
        == Config()
    )


@pytest.mark.parametrize(
    ("label", "yaml_text", "want"),
    [
        ("unknown top key", b"polcyd: {}\n", ":1: polcyd: unknown key"),
        (
            "unknown nested key",
            b"queue:\n  high_water: 5\n  hihg: 1\n",
            ":3: queue.hihg: unknown key",
        ),
        (
            "unknown domain key",
            b"domains:\n  example.com: {acton: forward}\n",
            ":2: domains.example.com.acton: unknown key",
        ),
        (
            "bad action",
            b"undelivered: {action: drop}\n",
            "undelivered.action: 'drop' is not an action",
        ),
        (
            "string for int",
            b"queue: {high_water: lots}\n",
            "queue.high_water: 'lots' is not an integer",
        ),
        ("bool is not int", b"queue: {high_water: true}\n", "is not an integer"),
        ("int for bool", b"dictionary_attack: {disconnect: 1}\n", "is not a boolean"),
        ("below minimum", b"dictionary_attack: {threshold: 0}\n", "below the minimum 1 attempts"),
        ("above maximum", b"dictionary_attack: {ipv6_prefix: 129}\n", "above the maximum 128 bits"),
        ("bad duration", b"dictionary_attack: {window: 10x}\n", "is not a duration"),
        ("bad network", b"dictionary_attack: {exempt: [10.0.0.0/33]}\n", "is not a network"),
        (
            "list expected",
            b"dictionary_attack: {exempt: 10.0.0.0/8}\n",
            "must be a list of networks",
        ),
        ("relative path", b"directory: {sqlite: dir.sqlite}\n", "is not an absolute path"),
        ("bad listen", b"policyd: {listen: '127.0.0.1:10040'}\n", "is not inet:HOST:PORT"),
        ("port zero", b"policyd: {listen: 'inet:127.0.0.1:0'}\n", "port must be 1-65535"),
        (
            "duplicate key",
            b"queue: {high_water: 1}\nqueue: {high_water: 2}\n",
            ":2: queue: duplicate key",
        ),
        ("not a mapping", b"- a\n- b\n", "must be a mapping"),
        ("yaml syntax", b"queue: {high_water: 1\n", "<config>:"),
        ("bad domain", b"domains: {'exa mple.com': {}}\n", "not a domain name"),
        (
            "readdress without target",
            b"domains: {a.example: {action: readdress}}\n",
            "readdress needs readdress_to",
        ),
        (
            "outbox without relay",
            b"domains: {a.example: {action: outbox}}\n",
            "outbox needs outbox_relay",
        ),
        (
            "outbox under sendmail without the socket map",
            b"milter: {role: sendmail}\n"
            b"domains: {a.example: {action: outbox, outbox_relay: '[mx2.example]'}}\n",
            "milter.socketmap_listen: action outbox under milter.role: sendmail needs it",
        ),
        (
            "outbox relay with a port under sendmail",
            b"milter: {role: sendmail, socketmap_listen: 'inet:127.0.0.1:10041'}\n"
            b"domains: {a.example: {action: outbox, outbox_relay: '[mx2.example]:25'}}\n",
            "domains.a.example.outbox_relay: under milter.role: sendmail give the host alone",
        ),
        (
            "bad socket map listen",
            b"milter: {role: sendmail, socketmap_listen: '127.0.0.1:10041'}\n",
            "milter.socketmap_listen: '127.0.0.1:10041' is not inet:HOST:PORT",
        ),
        (
            "readdress loop",
            b"domains:\n"
            b"  a.example: {action: readdress, readdress_to: b.example}\n"
            b"  b.example: {action: readdress, readdress_to: a.example}\n",
            "readdress loop: a.example -> b.example -> a.example",
        ),
        (
            "defer below high water",
            b"queue: {high_water: 100, defer_water: 50}\n",
            "queue.defer_water: must not be below",
        ),
        (
            "exception for foreign domain",
            b"domains: {example.com: {}}\nexceptions: {'a@other.example': {action: forward}}\n",
            "is not a local domain",
        ),
        ("bad postmaster", b"postmaster: 'not an address'\n", "postmaster: not an address"),
        (
            "null notify address",
            b"domains: {a.example: {action: create, notify: '<>'}}\n",
            "domains.a.example.notify: not an address",
        ),
        (
            "on_create through a relative program",
            b"domains: {a.example: {action: create, on_create: [hook.sh]}}\n",
            "domains.a.example.on_create: the program must be an absolute path",
        ),
        (
            "bad forward target",
            b"undelivered: {action: forward, forward_to: 'a b'}\n",
            "not an address or local part",
        ),
        ("unknown state backend", b"state: {backend: memcached}\n", "must be one of sqlite"),
        ("redis without url", b"state: {backend: redis}\n", "backend redis needs a url"),
        (
            "redis url of another scheme",
            b"state: {backend: redis, url: 'http://127.0.0.1:6379'}\n",
            "backend redis needs a url",
        ),
        (
            "password in the redis url",
            b"state: {backend: redis, url: 'redis://:pw@127.0.0.1:6379/0'}\n",
            "use password_file",
        ),
        ("empty key prefix", b"state: {key_prefix: ''}\n", "state.key_prefix: must not be empty"),
        ("redis timeout too long", b"state: {timeout: 1m}\n", "above the maximum 10 seconds"),
        ("invalid utf-8", b"postmaster: \xff\n", "not valid UTF-8"),
        ("NUL", b'postmaster: "a\\0b@example.com"\n', "NUL"),
    ],
)
def test_refused(label: str, yaml_text: bytes, want: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml_text)
    assert want in str(info.value)


def test_state_settings_load() -> None:
    config = parse_config(
        b"state:\n  backend: redis\n  url: 'unix:///run/redis/redis.sock?db=2'\n"
        b"  key_prefix: 'mx:'\n  password_file: /etc/traqmilter/redis.pw\n  timeout: 0.3\n"
    )
    state = config.state
    assert (state.backend, state.url, state.key_prefix) == (
        "redis",
        "unix:///run/redis/redis.sock?db=2",
        "mx:",
    )
    assert (state.password_file, state.timeout) == ("/etc/traqmilter/redis.pw", 0.3)
    assert parse_config(b"").state.backend == "sqlite"


def test_outbox_under_sendmail_with_its_socket_map_loads(tmp_path: Path) -> None:
    path = tmp_path / "traqmilter.yaml"
    path.write_text(
        "milter: {role: sendmail, socketmap_listen: 'unix:/run/traqmilter/socketmap.sock'}\n"
        "domains: {a.example: {action: outbox, outbox_relay: '[mx2.example]'}}\n"
    )
    config = load_config(str(path))
    assert config.milter.socketmap_listen == "unix:/run/traqmilter/socketmap.sock"


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(b"queue: {high_water: x}\npolicyd: {listen: y}\nbogus: 1\n")
    assert len(info.value.problems) == 3
    assert [p.line for p in info.value.problems] == [1, 2, 3]


def test_named_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))


def test_no_path_is_the_embedded_default() -> None:
    """Whatever the machine holds under /etc: the library reads no file it was not given."""
    assert load_config(None) == embedded_default()


def test_file_path_appears_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("queue:\n  high_water: -1\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: queue.high_water"):
        load_config(str(path))


def test_action_settings_load() -> None:
    config = parse_config(
        b"loops: {max_hops: 3, max_received: 20}\n"
        b"bounce:\n"
        b"  submit: sendmail\n"
        b"  sendmail_command: [/usr/sbin/sendmail, -i, -f, '']\n"
        b"  smtp_submit: 'unix:/var/spool/postfix/private/dsn'\n"
        b"  rate_per_sender: 2\n"
        b"  rate_window: 30m\n"
        b"  reporting_mta: mx.example.com\n"
        b"create: {local_part_pattern: '[a-z]+', max_length: 12, reserved: [sales],"
        b" rate_per_hour: 5, max_total: 50}\n"
        b"policyd: {socketmap_listen: 'inet:127.0.0.1:10041'}\n"
    )
    assert (config.loops.max_hops, config.loops.max_received) == (3, 20)
    assert config.bounce.submit == "sendmail"
    assert config.bounce.sendmail_command == ("/usr/sbin/sendmail", "-i", "-f", "")
    assert config.bounce.smtp_submit == "unix:/var/spool/postfix/private/dsn"
    assert config.bounce.rate_window == 1800 and config.bounce.rate_per_sender == 2
    assert config.create.reserved == ("sales",) and config.create.max_total == 50
    assert config.policyd.socketmap_listen == "inet:127.0.0.1:10041"


def test_action_settings_defaults() -> None:
    config = Config()
    assert config.loops.max_hops == 5 and config.loops.max_received == 30
    assert config.bounce.submit == "smtp" and config.bounce.smtp_submit == "inet:127.0.0.1:10026"
    assert config.create.rate_per_hour == 20 and "www" in config.create.reserved


@pytest.mark.parametrize(
    ("yaml_text", "want"),
    [
        (b"loops: {max_hops: 0}\n", "loops.max_hops: 0 is below the minimum 1 hops"),
        (b"loops: {max_received: 201}\n", "above the maximum 200 headers"),
        (b"bounce: {smtp_submit: '127.0.0.1:10026'}\n", "is not inet:HOST:PORT"),
        (b"bounce: {rate_window: 10s}\n", "bounce.rate_window: 10.0 is below the minimum 60"),
        (b"create: {max_length: 65}\n", "create.max_length: 65 is above the maximum 64"),
        (b"create: {reserved: root}\n", "create.reserved: must be a list of strings"),
        (b"policyd: {socketmap_listen: 'tcp:x'}\n", "is not inet:HOST:PORT"),
        # choices come from the schema (Kind.CHOICE)
        (b"log: {destination: journal}\n", "log.destination: must be one of stderr, syslog"),
        (b"log: {format: xml}\n", "log.format: must be one of text, json"),
        (b"log: {level: 3}\n", "log.level: must be one of info, debug"),
        (b"log: {syslog_facility: local8}\n", "log.syslog_facility: must be one of mail, daemon"),
        (b"bounce: {submit: [smtp]}\n", "bounce.submit: must be a one of, not a list"),
    ],
)
def test_action_settings_refused(yaml_text: bytes, want: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml_text)
    assert want in str(info.value)


def test_action_settings_no_key_type_can_check() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(b"bounce: {submit: fax}\ncreate: {local_part_pattern: '(['}\n")
    text = str(info.value)
    assert "bounce.submit: must be one of smtp, sendmail" in text
    assert "create.local_part_pattern: not a regular expression" in text


def test_unknown_milter_role_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"milter\.role: must be one of postfix, sendmail"):
        parse_config(b"milter: {role: exim}\n")


def test_settings_problems() -> None:
    assert settings_problems(Config()) == []
    bad = Config(
        bounce=BounceSettings(reporting_mta="bad host"),
    )
    paths = [path for path, _problem in settings_problems(bad)]
    assert paths == ["bounce.reporting_mta"]
    sendmail = Config(bounce=BounceSettings(submit="sendmail", sendmail_command=("sendmail",)))
    assert [p for p, _ in settings_problems(sendmail)] == ["bounce.sendmail_command"]


def test_a_choice_declaration_must_hold_its_default() -> None:
    from traqmilter.core.settings import Kind, setting

    with pytest.raises(ValueError, match="choices"):
        setting("fax", Kind.CHOICE, "How.", choices=("smtp", "sendmail"))
    with pytest.raises(ValueError, match="choices"):
        setting("smtp", Kind.STR, "How.", choices=("smtp",))


def test_domains_not_listed_are_taken_from_postfix() -> None:
    for text in (b"domains: auto\n", b"log: {level: debug}\n"):
        config = parse_config(text)
        assert config.auto_domains and config.directory.postfix == "auto"
    listed = parse_config(b"domains: {example.com: {}}\n")
    assert not listed.auto_domains and listed.directory.postfix == "none"  # not widened
    both = parse_config(b"directory: {postfix: auto}\ndomains: {example.com: {}}\n")
    assert not both.auto_domains and both.directory.postfix == "auto"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (b"directory: {postfix: none}\n", "<config>: domains: domains not listed (or auto)"),
        (b"directory: {postfix: maybe}\n", ':1: directory.postfix: must be one of "", auto, none'),
        (b"auto_domains: true\n", ":1: auto_domains: unknown key"),
    ],
)
def test_bad_postfix_discovery_settings(text: bytes, want: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert want in str(caught.value)
