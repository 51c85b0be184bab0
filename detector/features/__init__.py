"""The FeatureEngine and its state; the same code path serves training and scoring."""

from detector.features.engine import MODEL_FEATURES, FeatureEngine
from detector.features.settings import FeatureSettings

__all__ = ["MODEL_FEATURES", "FeatureEngine", "FeatureSettings"]
