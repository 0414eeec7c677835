"""Ops tooling: fleet queries, timelines, uptime, diagnostics, topic watching, metrics.

Everything here reads what the bridge writes (the SQL tables and the retained topics) and
never changes it, except :mod:`bridge.ops.retention`, which the bridge schedules. The CLI
in :mod:`bridge.cli.ops_cmd` only parses options, calls these and renders the result.
"""
