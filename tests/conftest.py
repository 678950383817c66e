"""Shared pytest fixtures: the real-Postfix harness and the outside-world capture server."""

from tests.support.fixtures import capture_server, postfix_factory  # noqa: F401
