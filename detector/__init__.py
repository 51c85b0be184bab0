"""exfilwatch: catches bulk theft of customer data in database access logs while it happens."""

__version__ = "0.1.0"
