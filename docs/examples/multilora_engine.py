"""vLLM's "Multiple LoRA adapters" example, unchanged except for the import and the paths.

Usage: python docs/examples/multilora_engine.py MODEL SQL_ADAPTER_DIR MATH_ADAPTER_DIR
"""
import sys

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.lora.request import LoRARequest

model, sql_path, math_path = sys.argv[1:4]

# Initialize with multi-LoRA support
engine_args = EngineArgs(
    model=model,
    enable_lora=True,
    max_loras=2,  # Number of LoRAs that can be active simultaneously
    max_lora_rank=64,  # Maximum rank across all adapters
    max_cpu_loras=4,  # Size of CPU cache for swapped-out adapters
)
engine = LLMEngine.from_engine_args(engine_args)

# Define requests with different adapters
requests = [
    ("Base model prompt", None),
    ("SQL task prompt", LoRARequest("sql-lora", 1, sql_path)),
    ("Math task prompt", LoRARequest("math-lora", 2, math_path)),
    ("Another SQL prompt", LoRARequest("sql-lora", 1, sql_path)),
]
sampling_params = SamplingParams(temperature=0.8, max_tokens=256)

# Add requests to engine
for i, (prompt, lora_request) in enumerate(requests):
    engine.add_request(
        str(i),
        prompt,
        sampling_params,
        lora_request=lora_request
    )

# Process all requests (loraplex handles adapter switching)
while engine.has_unfinished_requests():
    outputs = engine.step()
    for output in outputs:
        if output.finished:
            print(f"Request {output.request_id}: {output.outputs[0].text!r}")
