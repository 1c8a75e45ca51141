"""Home Assistant custom integrations of NSync (copy `nsync/` into your config folder)."""
