"""A small random Llama for LLM tests: GQA, tied embeddings, K = 64 and 128 (3-bit words,
2-bit groups and 2:4 groups fit)."""

from __future__ import annotations


def tiny_llama(seed: int = 0):
    """``LlamaForCausalLM`` (vocab 256, hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads),
    random weights from ``torch.manual_seed(seed)``, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()
