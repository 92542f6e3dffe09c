"""arm-int4: Hugging Face LLM to INT4 (W4A8-dynamic) inference on Arm CPU servers with vLLM."""

__version__ = "0.1.0"
