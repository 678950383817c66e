"""A tiny authoritative DNS server on loopback for tests, written with dnspython's message
API: it answers from a fixed table, NXDOMAIN for names it does not have, and counts the
questions it was asked. Never a real resolver: tests point their resolver here.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    """UDP on 127.0.0.1, a port from the OS. records: (name, type) -> rdata texts, e.g.
    ("spf-pass.example", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"']."""

    def __init__(self, records: Mapping[tuple[str, str], Sequence[str]]) -> None:
        self.records = {
            (n.lower().rstrip("."), t.upper()): list(v) for (n, t), v in records.items()
        }
        self.questions: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.05)  # so the serving thread sees _stopping promptly
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._stopping = threading.Event()

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()
        return f"{host}:{port}"

    def asked(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.questions)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            self._socket.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            qtype = dns.rdatatype.to_text(question.rdtype)
            with self._lock:
                self.questions.append((name, qtype))
            texts = self.records.get((name, qtype))
            if texts:
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, qtype, texts)
                )
            elif not any(n == name for n, _t in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()
