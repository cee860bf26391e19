"""BayesFake Hub detector package: the configuration, model and image processor that ship in every Hub repo,
plus export (``hub_models.export``) and offline-first loading (``hub_models.hub``)."""

from .configuration_bayesfake import BayesFakeConfig
from .image_processing_bayesfake import BayesFakeImageProcessor
from .modeling_bayesfake import BayesFakeDetector, BayesFakeOutput

__all__ = ["BayesFakeConfig", "BayesFakeDetector", "BayesFakeImageProcessor", "BayesFakeOutput"]
