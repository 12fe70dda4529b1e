"""mta-serve: an inference serving engine for Multi-Token Attention language models."""
from .config import CacheConfig, ConfigError, ModelConfig, MTAConfig, SchedulerConfig
from .engine import LLMEngine, RequestError, RequestOutput
from .llm import LLM
from .model import MTATransformer, build_model
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["CacheConfig", "ConfigError", "LLM", "LLMEngine", "ModelConfig", "MTAConfig", "MTATransformer",
           "RequestError", "RequestOutput", "SamplingParams", "SchedulerConfig", "build_model", "__version__"]
