"""LoRARequest: which adapter a request runs with. Same fields and positional order as vLLM."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = field(default=None)
    load_inplace: bool = False
    # Tensors handed over directly (by an adapter-loader plugin or a test) instead of a path.
    # Not compared: two requests are the same adapter when their name and id agree.
    tensors: dict | None = field(default=None, repr=False, compare=False)
    config: dict | None = field(default=None, repr=False, compare=False)
    # The directories this adapter's files must lie in, after following symlinks (the server's
    # --allowed-lora-paths, set on runtime loads): checked by the loader at every read from storage,
    # reloads after a cache eviction included. None: no restriction (and a path that is not a local
    # directory but looks like ``org/name`` may be downloaded from the Hugging Face Hub).
    allowed_paths: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an int > 0, got {self.lora_int_id!r}")
        if self.lora_path is None:
            self.lora_path = ""
        self.lora_path = str(self.lora_path)
        if self.allowed_paths is not None:
            if isinstance(self.allowed_paths, (str, bytes)) or not all(
                    isinstance(p, str) and p for p in self.allowed_paths):
                raise ValueError("LoRARequest.allowed_paths must be a sequence of directory paths")
            self.allowed_paths = tuple(self.allowed_paths)

    # vLLM names kept for code written against it.
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __hash__(self) -> int:
        return hash((self.lora_name, self.lora_int_id))
