"""loraplex: serve many LoRA adapters on one base LLM, with vLLM's API."""
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine_args import EngineArgs
from loraplex.entrypoints.llm import LLM
from loraplex.outputs import CompletionOutput, RequestOutput
from loraplex.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]
