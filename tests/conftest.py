"""Shared fixtures: tiny random Llama models and their Hugging Face twins."""

from __future__ import annotations

import os

import pytest
import torch

from eaglespec.config import EngineConfig, LlamaConfig
from eaglespec.models.llama import build_model


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def seeded_randn(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Normal values drawn on the CPU from ``seed`` (the same on every device), then moved to DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(device=DEVICE, dtype=dtype)


def _triton_kernels_runnable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# Triton kernels run on a GPU, or on the CPU through the interpreter (CI sets TRITON_INTERPRET=1).
needs_triton_kernels = pytest.mark.skipif(not _triton_kernels_runnable(),
                                          reason="Triton kernels need triton and a GPU, or TRITON_INTERPRET=1")


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
    base.update(overrides)
    return LlamaConfig(**base)


def random_model(cfg: LlamaConfig, seed: int = 0, dtype=torch.float32, device="cpu"):
    model = build_model(cfg, device, dtype)
    model.init_random(seed=seed, std=0.1)
    # Random (not unit) norm weights so a wrong norm wiring shows.
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, device=device))
    return model


def small_engine(**overrides) -> EngineConfig:
    # overlap_decode: the engine's GPU behaviour (steps queued before the last is read), which
    # its default leaves off on a CPU; tests that compare with step by step turn it off.
    base = dict(block_size=16, num_blocks=64, max_batch_size=8, max_model_len=256,
                attention_backend="torch", use_cuda_graphs=False, overlap_decode=True)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture
def tiny_cfg():
    return tiny_config()
