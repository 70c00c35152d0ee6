"""Shared fixtures live in tests/support/*; they are registered here as plugins."""

pytest_plugins: list[str] = [
    "tests.support.redis_server",
    "tests.support.simulator",
    "tests.support.router",
    "tests.support.stores",
    "tests.support.webhook_fixtures",
]
