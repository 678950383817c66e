"""policyd: the Postfix policy-delegation server (check_policy_service, SMTPD_POLICY_README).

codec     - the protocol without I/O: bytes to PolicyRequest or ProtocolError, replies to bytes
server    - the asyncio server: persistent connections, limits, graceful stop
adapter   - PolicyRequest -> Engine.rcpt() -> action text (DUNNO or the engine's reply)
socketmap - a socketmap(5) server answering transport lookups for the outbox action
main      - the daemon: both servers around one runtime, reload and stop on signals
"""
