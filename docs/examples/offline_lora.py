"""vLLM's offline LoRA quick start, unchanged except for the import and the paths.

Usage: python docs/examples/offline_lora.py MODEL SQL_ADAPTER_DIR
"""
import sys

from loraplex import LLM, SamplingParams
from loraplex.lora.request import LoRARequest

model, sql_lora_path = sys.argv[1:3]

# Initialize base model with LoRA support
llm = LLM(
    model=model,
    enable_lora=True
)

# Configure sampling
sampling_params = SamplingParams(
    temperature=0,
    max_tokens=256,
    stop=["[/assistant]"],
)

# Prompts for the SQL adapter
prompts = [
    "[user] Write a SQL query to answer the question based on the table schema.\n\n"
    "context: CREATE TABLE airports (icao VARCHAR, airport VARCHAR)\n\n"
    "question: Name the ICAO for Lilongwe International Airport [/user] [assistant]",
]

# Generate with LoRA adapter
outputs = llm.generate(
    prompts,
    sampling_params,
    lora_request=LoRARequest("sql_adapter", 1, sql_lora_path),
)

for output in outputs:
    print(f"Generated SQL: {output.outputs[0].text!r}")
