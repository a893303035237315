"""A handler module that cannot be imported (for boot-failure tests)."""

raise ImportError("broken_handlers is broken on purpose")
