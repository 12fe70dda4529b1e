"""mta-serve: an inference serving engine for Multi-Token Attention language models."""
from .config import ConfigError, ModelConfig, MTAConfig
from .model import MTATransformer, build_model

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "MTAConfig", "MTATransformer", "build_model", "__version__"]
