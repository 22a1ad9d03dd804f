"""One blueprint per resource: ``routes.py`` (thin views) and ``schemas.py``."""
