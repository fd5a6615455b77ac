"""Command handlers for the CLI, one module per command group."""
