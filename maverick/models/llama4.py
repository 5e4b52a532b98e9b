"""Llama 4 (Maverick) as one PyTorch module tree whose parameter names are the Hugging Face
checkpoint's (`language_model.model.layers.{i}...`, `vision_model...`, `multi_modal_projector...`),
except the routed experts, which are stacked (see layers/moe.py and checkpoint.py).

The text forward takes a flat batch of tokens from many sequences (prefill chunks and decodes
mixed), their absolute positions, and paged-attention metadata; K/V go to and come from a paged
cache, so one step can serve many requests. The metadata picks the path: `AttentionMetadata` runs
the reference (SDPA attention planned on the host, grouped MoE: any batch, any device), and
`DecodeMetadata` the fixed-shape decode path (Triton kernels for attention and routed experts, no
host sync: what a CUDA graph captures).
"""

from __future__ import annotations

import torch
from torch import nn

from maverick.config import ModelConfig, TextConfig
from maverick.kernels import torch_decode
from maverick.kernels.paged_attention import paged_decode_attention
from maverick.layers.attention import (
    AttentionMetadata,
    DecodeMetadata,
    allocate_kv_caches,
    paged_attention,
    write_kv,
)
from maverick.layers.linear import MergedColumnLinear
from maverick.layers.mlp import MLP
from maverick.layers.moe import MoE
from maverick.layers.norm import RMSNorm
from maverick.layers.parallel import SINGLE, TensorParallel, set_shard
from maverick.layers.rope import PositionTables, apply_rope
from maverick.models.vision import MultiModalProjector, VisionModel

KVCache = tuple[
    torch.Tensor, torch.Tensor
]  # (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]


class TextAttention(nn.Module):
    """Tensor parallel by heads: this rank's query heads and the KV heads they attend with (its
    KV cache holds only those); o_proj row parallel, summed over ranks."""

    def __init__(self, cfg: TextConfig, layer: int, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.num_heads = tp.divide(cfg.num_attention_heads, "num_attention_heads")  # on this rank
        self.num_kv_heads, kv_shard = tp.kv_heads(cfg.num_key_value_heads, cfg.num_attention_heads)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.use_rope = cfg.uses_rope(layer)
        # RoPE layers see only their own chunk; NoPE layers see everything, with temperature tuning.
        self.chunk_size = cfg.attention_chunk_size if self.use_rope else None
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        H, D = cfg.hidden_size, cfg.head_dim
        # q, k, v in one GEMM (checkpoint: q_proj, k_proj, v_proj), column parallel
        self.qkv_proj = MergedColumnLinear(
            H,
            {
                "q_proj": (self.num_heads * D, tp.shard(0)),
                "k_proj": (self.num_kv_heads * D, kv_shard),
                "v_proj": (self.num_kv_heads * D, kv_shard),
            },
            dtype,
        )
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False, dtype=dtype)
        set_shard(self.o_proj.weight, tp.shard(1))

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        tables: PositionTables,  # RoPE and temperature of this step's positions
        meta: AttentionMetadata | DecodeMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q heads, then k heads, then v heads: q and k rotate as one tensor
        qk, v = qkv.split_with_sizes([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.use_rope:
            qk = apply_rope(qk, tables.cos, tables.sin)
        q, k = qk.split_with_sizes([self.num_heads, self.num_kv_heads], dim=1)
        if self.temperature_tuning:
            q = (q * tables.q_scale).to(q.dtype)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if isinstance(meta, DecodeMetadata) and meta.torch_kernels:
            o = torch_decode.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, self.chunk_size
            )  # [T, heads, head_dim]
        elif isinstance(meta, DecodeMetadata):
            o = paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                self.scale,
                self.chunk_size,
                num_splits=meta.num_splits,
            )  # [T, heads, head_dim]
        else:
            o = paged_attention(q, k_cache, v_cache, meta, self.scale, self.chunk_size)
        return self.tp.all_reduce(self.o_proj(o.reshape(T, self.num_heads * self.head_dim)))


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: TextConfig, layer: int, dtype: torch.dtype, fp8_experts: bool, tp: TensorParallel
    ):
        super().__init__()
        self.self_attn = TextAttention(cfg, layer, dtype, tp)
        if cfg.is_moe(layer):
            self.feed_forward: nn.Module = MoE(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, dtype, fp8_experts, tp
            )
        else:
            self.feed_forward = MLP(cfg.hidden_size, cfg.intermediate_size_mlp, dtype, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x, tables, meta, kv_cache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), tables, meta, kv_cache)
        h_norm = self.post_attention_layernorm(h)
        if isinstance(self.feed_forward, MoE) and isinstance(meta, DecodeMetadata):
            # fixed-shape routed experts; padding rows are skipped
            return h + self.feed_forward(
                h_norm, fixed_shape=True, real_rows=meta.real_rows(), torch_kernels=meta.torch_kernels
            )
        return h + self.feed_forward(h_norm)


class VocabParallelEmbedding(nn.Embedding):
    """Each rank holds a contiguous slice of the vocabulary's rows; a token outside it looks up
    zeros, and the sum over ranks is the embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp: TensorParallel):
        super().__init__(tp.divide(vocab_size, "vocab_size"), hidden_size, dtype=dtype)
        self.tp = tp
        self.vocab_start = tp.rank * self.num_embeddings
        set_shard(self.weight, tp.shard(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = super().forward(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(out)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype, fp8_experts: bool, tp: TensorParallel):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, fp8_experts, tp) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, embeds, positions, meta, kv_caches: list[KVCache]) -> torch.Tensor:
        tables = PositionTables.build(positions, self.cfg)  # once per step, shared by all layers
        h = embeds
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, tables, meta, kv_cache)
        return self.norm(h)


class CausalLM(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype, fp8_experts: bool, tp: TensorParallel):
        super().__init__()
        self.model = TextModel(cfg, dtype, fp8_experts, tp)
        # vocabulary parallel (Maverick's head is 202048 × 5120); the logits are gathered
        vocab = tp.divide(cfg.vocab_size, "vocab_size")
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False, dtype=dtype)
        set_shard(self.lm_head.weight, tp.shard(0))


class Llama4Model(nn.Module):
    """Text decoder + vision tower + projector. `dtype` is the compute dtype (fp32 or bf16);
    `fp8_experts` keeps the routed experts in FP8 and runs them through `_scaled_mm`.

    With tensor parallelism each rank builds its slice of the text decoder. The vision tower and
    projector live on rank 0 only: their output is an input of the text forward, which rank 0
    sends to the other ranks with the step anyway, so encoding each image once saves the other
    ranks its compute and the tower's weights (Maverick's: ~1.7 GB in bf16)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.bfloat16,
        fp8_experts: bool = False,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.fp8_experts = fp8_experts
        self.tp = tp
        self.language_model = CausalLM(config.text, dtype, fp8_experts, tp)
        self.has_vision = tp.rank == 0
        if self.has_vision:
            self.vision_model = VisionModel(config.vision).to(dtype)
            self.multi_modal_projector = MultiModalProjector(
                config.vision.vision_output_dim, config.text.hidden_size
            ).to(dtype)
        self.num_kv_heads = self.language_model.model.layers[0].self_attn.num_kv_heads  # on this rank

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def use_moe_kernel(self, enabled: bool) -> None:
        """Routed experts of every step through the fused Triton kernel (enabled), or of the
        fixed-shape decode steps only, the others through the grouped reference (the default)."""
        for layer in self.language_model.model.layers:
            if isinstance(layer.feed_forward, MoE):
                layer.feed_forward.kernel = enabled

    def allocate_kv_caches(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
    ) -> list[KVCache]:
        """A paged KV cache for every layer, on the model's device."""
        cfg = self.config.text
        return allocate_kv_caches(
            cfg.num_hidden_layers,
            num_blocks,
            block_size,
            self.num_kv_heads,
            cfg.head_dim,
            dtype or self.dtype,
            self.device,
        )

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, S, S] -> [tiles * tokens_per_tile, text hidden]: one row per <|patch|>."""
        feats = self.vision_model(pixel_values.to(self.dtype))  # [tiles, tokens_per_tile, vision_output_dim]
        return self.multi_modal_projector(feats.flatten(0, 1))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata | DecodeMetadata,
        kv_caches: list[KVCache],
        image_embeds: torch.Tensor | None = None,  # [P, hidden]
        image_mask: torch.Tensor | None = None,  # [T] bool: the P prompt <|patch|> positions, in order
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (after the last norm).

        `meta` picks the path: `AttentionMetadata` the reference (any batch), `DecodeMetadata` the
        fixed-shape decode path (one token per row, Triton kernels, no host sync; no images).

        Image features replace the embeddings at `image_mask`. The mask is explicit because only a
        prompt's <|patch|> tokens are image positions: the same id sampled by the model is text.
        """
        embeds = self.language_model.model.embed_tokens(input_ids)  # [T, hidden]
        if image_embeds is not None or image_mask is not None:
            n_mask = 0 if image_mask is None else int(image_mask.sum())
            n_rows = 0 if image_embeds is None else image_embeds.shape[0]
            if n_mask != n_rows:
                raise ValueError(f"{n_mask} image positions in the batch but {n_rows} image embedding rows")
            if n_rows:
                embeds = embeds.masked_scatter(image_mask[:, None], image_embeds.to(embeds.dtype))
        return self.language_model.model(embeds, positions, meta, kv_caches)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32 (on every rank)."""
        return self.tp.all_gather(self.language_model.lm_head(hidden)).float()
