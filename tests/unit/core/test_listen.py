"""Listen addresses: what the config accepts is what the daemons bind."""

import pytest

from traqmilter.core.listen import ListenAddress, parse_listen


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("inet:127.0.0.1:10040", ListenAddress("inet", host="127.0.0.1", port=10040)),
        ("inet:[::1]:8891", ListenAddress("inet", host="::1", port=8891)),
        ("inet:localhost:25", ListenAddress("inet", host="localhost", port=25)),
        ("inet:localhost:65535", ListenAddress("inet", host="localhost", port=65535)),
        (
            "unix:/run/traqmilter/policyd.sock",
            ListenAddress("unix", path="/run/traqmilter/policyd.sock"),
        ),
    ],
)
def test_parse_listen(text: str, want: ListenAddress) -> None:
    assert parse_listen(text) == want
    assert str(want) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tcp:1.2.3.4:5",
        "inet:1.2.3.4",
        "inet::25",
        "inet:h:99999",
        "inet:h:65536",
        "inet:h:0",
        "inet:h:-1",
        "inet:[::1:25",
        "inet:a b:25",
        "unix:",
        "unix:relative.sock",
        "inet:127.0.0.1:25\n",
    ],
)
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"inet:HOST:PORT|port must|must be absolute"):
        parse_listen(text)


def test_any_port_only_when_allowed() -> None:
    assert parse_listen("inet:127.0.0.1:0", any_port=True).port == 0
    with pytest.raises(ValueError, match="port must"):
        parse_listen("inet:127.0.0.1:0")
