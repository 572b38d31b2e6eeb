"""The language model takes precomputed input embeddings (what a multi-modal prefill feeds it: token embeddings with
encoder outputs scattered in), and matches HF transformers given the same ``inputs_embeds``."""
from __future__ import annotations

import pytest
import torch

from loraplex import EngineArgs, LLMEngine
from loraplex.layers.attention import AttentionMetadata


@pytest.mark.parametrize("arch", ["llama", "granite"])
def test_inputs_embeds_match_hf(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(arch)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=64, block_size=16))
    model = engine.model
    ids = torch.tensor([5, 17, 33, 99, 4, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])  # [num_tokens]
    n = ids.numel()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        embeds = model.embed_tokens(ids).clone()  # [num_tokens, hidden]
        embeds[3:9] = torch.randn(6, embeds.shape[1], generator=gen)  # "image features" at placeholder positions
        blocks = [1, 2]  # block 0 is reserved
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([blocks[p // 16] * 16 + p % 16 for p in range(n)]),
            block_tables=torch.tensor([blocks], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32), max_query_len=n, max_seq_len=n)
        hidden = model(ids, torch.arange(n), meta, inputs_embeds=embeds)  # [num_tokens, hidden]
        ours = model.compute_logits(hidden).log_softmax(-1)
        plain = model.compute_logits(model(ids, torch.arange(n), meta)).log_softmax(-1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = hf(inputs_embeds=embeds.unsqueeze(0)).logits[0].float().log_softmax(-1)
        want_plain = hf(ids.unsqueeze(0)).logits[0].float().log_softmax(-1)
    assert torch.allclose(ours, want, atol=1e-4), (ours - want).abs().max()
    assert torch.allclose(plain, want_plain, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-2  # the embeddings did change the output
