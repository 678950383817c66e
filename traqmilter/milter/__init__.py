"""The milter: carries out the accept-time actions at end of message (SPEC 2 and 4).

adapter: the pymilter callbacks; service: shared state, locks and effects; submit: DSN
hand-over to the MTA; server: libmilter's listener (run_milter).
"""
