"""monthly-token-reset: monthly allowances reset for every user, and a page when they don't."""

__version__ = "0.1.0"
