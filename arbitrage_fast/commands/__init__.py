"""Implementations of the `arbitrage-fast` subcommands (the CLI only parses arguments)."""
