"""The CMS-facing side of commands: the enqueue API, waiting for outcomes, and the
dispatcher that publishes due commands and applies their acks."""
