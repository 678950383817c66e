"""Test support: a private Postfix, a capture SMTP server, an SMTP client helper."""
