"""vLLM's "Default multi-modal LoRAs" example (Granite Speech), unchanged except for the import, the paths, and
the audio clip (vLLM's AudioAsset downloads one; this takes a .wav path, or makes one-second tone).

Usage: python docs/examples/granite_speech_default_mm_loras.py MODEL_DIR [CLIP.wav]
"""
import sys

import numpy as np

from loraplex import LLM, SamplingParams

model_path = sys.argv[1]

llm = LLM(
    model=model_path,
    enable_lora=True,
    max_lora_rank=64,
    # Automatically apply audio LoRA when audio inputs are present
    default_mm_loras={"audio": model_path},
)

if len(sys.argv) > 2:
    import soundfile

    clip, rate = soundfile.read(sys.argv[2], dtype="float32")
    audio = (clip, rate)
else:
    audio = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32), 16000)

outputs = llm.generate(
    {
        "prompt": "<|audio|>Transcribe this:",
        "multi_modal_data": {"audio": audio},
    },
    sampling_params=SamplingParams(temperature=0.2, max_tokens=64),
)
for output in outputs:
    print("Adapter:", output.lora_request.lora_name if output.lora_request else None)
    print("Generated:", repr(output.outputs[0].text))
