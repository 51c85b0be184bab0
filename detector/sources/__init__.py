"""Sources of canonical access events. Each yields polars frames with exactly
:data:`detector.schema.EVENT_SCHEMA` and sends bad records to a quarantine, never raising for one.
"""

from detector.sources.files import SUPPORTED_SUFFIXES, expand_paths, read_events

__all__ = ["SUPPORTED_SUFFIXES", "expand_paths", "read_events"]
