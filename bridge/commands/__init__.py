"""Commands to devices: lifecycle rules, the enqueue API and delivery."""
