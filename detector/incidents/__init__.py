"""Grouping anomalous events into incidents."""
