"""Tiny randomly initialised models of each block layout transformers offers that monoscope must handle:
sequential pre-norm (Llama, GPT-2), post-norm (Gemma 3, OLMo 2, GLM-4), parallel attention + MLP (GPT-NeoX,
Phi) and mixture-of-experts (Qwen2-MoE with a shared expert, Mixtral). Two layers, width 32, built in
milliseconds."""

from __future__ import annotations

import torch

WIDTH = 32
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
_DECODER = dict(
    hidden_size=WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    **IDS,
)


def _config(family: str, vocab_size: int):
    import transformers as T

    if family == "llama":
        return T.LlamaConfig(vocab_size=vocab_size, **_DECODER)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab_size, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=256, **IDS)
    if family == "gemma3_text":  # one sliding-window and one global layer; sub-block outputs post-normed
        return T.Gemma3TextConfig(
            vocab_size=vocab_size,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            **_DECODER,
        )
    if family == "olmo2":  # post-norm only: no norm before attention or the MLP
        return T.Olmo2Config(vocab_size=vocab_size, **_DECODER)
    if family == "glm4":  # post-norms named post_self_attn_layernorm / post_mlp_layernorm
        return T.Glm4Config(vocab_size=vocab_size, head_dim=8, **_DECODER)
    if family == "gpt_neox":  # parallel: x + attn(ln1(x)) + mlp(ln2(x))
        return T.GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            use_parallel_residual=True,
            **IDS,
        )
    if family == "phi":  # parallel with one shared input norm
        return T.PhiConfig(
            vocab_size=vocab_size,
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            **IDS,
        )
    if family == "qwen2_moe":  # routed experts plus a gated shared expert
        return T.Qwen2MoeConfig(
            vocab_size=vocab_size,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            **_DECODER,
        )
    if family == "mixtral":
        return T.MixtralConfig(vocab_size=vocab_size, num_local_experts=4, num_experts_per_tok=2, **_DECODER)
    raise KeyError(family)


FAMILIES = ("llama", "gpt2", "gemma3_text", "olmo2", "glm4", "gpt_neox", "phi", "qwen2_moe", "mixtral")
POST_NORM = ("gemma3_text", "olmo2", "glm4")


def tiny_family(family: str, vocab_size: int, seed: int = 0):
    """A tiny random model of `family`, in eval mode, with non-trivial norm gains and biases (random init
    leaves them at 1 and 0, which would hide a hook on the wrong side of a norm)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, vocab_size)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model
