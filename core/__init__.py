"""loraplex: serve many LoRA adapters on one base LLM."""
