"""What the service tests share: a small live sample after the default model's training window,
settings in a temporary directory, a running service and its API client."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from detector import config
from detector.api.app import create_app
from detector.live import Service
from detector.sinks.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


def write_live_sample(out: Path) -> Path:
    """Two simulated days right after the default model's training window (seed 7), the
    seven attacks on the second day: 24,625 events."""
    from detector.samples import write_sample

    write_sample(out, days=2, seed=7, start=date(2026, 1, 14), events_per_day=10_000,
                 attack_days=1)
    return out


def models_copy(tmp: Path) -> Path:
    """A private copy of the shipped models (tests promote versions in it)."""
    dest = tmp / "models"
    shutil.copytree(ROOT / "models", dest)
    return dest


def settings_for(tmp: Path, models: Path, **overrides: Any) -> config.Settings:
    data: dict[str, Any] = {
        "state_dir": tmp / "var",
        "models_dir": models,
        "sources": [{"name": "spool", "kind": "directory", "path": str(tmp / "spool")}],
        "pipeline": {"batch_delay_s": 0.05, "poll_s": 0.02, "snapshot_every_s": 3600},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config.Settings(**data)


@contextmanager
def running(settings: config.Settings, **kwargs: Any) -> Iterator[Service]:
    service = Service(settings, metrics=Metrics(), **kwargs)
    service.start()
    try:
        yield service
    finally:
        if not service.health.stopping:
            service.stop()


@contextmanager
def api(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service), base_url="http://127.0.0.1") as client:
        yield client


def metric(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


def all_incidents(service: Service) -> list[dict[str, Any]]:
    return service.store.incidents(limit=100_000)
