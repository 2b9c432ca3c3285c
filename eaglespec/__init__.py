"""eaglespec: EAGLE speculative decoding for Llama models."""

from eaglespec.config import EngineConfig, LlamaConfig, SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.engine.request import Output

__all__ = ["LLM", "SamplingParams", "SpecConfig", "EngineConfig", "LlamaConfig", "Output"]
__version__ = "0.1.0"
