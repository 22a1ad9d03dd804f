"""Plain functions shared by the views, the CLI, beat and the worker; no HTTP here."""
