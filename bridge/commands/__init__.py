"""Commands to devices: the pure lifecycle rules (the CMS-facing side is in
``bridge.outbox``, the kiosk side in ``bridge.kiosk``)."""
