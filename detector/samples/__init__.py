"""A deterministic simulator of a multi-tenant SaaS PostgreSQL database's access log, with
seven labelled data-theft scenarios injected into the final days.

>>> from detector.samples import SCENARIO_NAMES
>>> len(SCENARIO_NAMES)
7
"""

from detector.samples.attacks import SCENARIO_NAMES
from detector.samples.generator import SampleSummary, generate, write_sample
from detector.samples.jobs import BENIGN_ACTIVITIES
from detector.samples.labels import BenignLabel, Labels, ScenarioLabel

__all__ = [
    "BENIGN_ACTIVITIES",
    "SCENARIO_NAMES",
    "BenignLabel",
    "Labels",
    "SampleSummary",
    "ScenarioLabel",
    "generate",
    "write_sample",
]
