"""A functional forward pass over an open_clip ``VisionTransformer``.

Every region embedder needs a slightly different pass through the same ViT: MaskInversion needs
the last block's attention probabilities, Alpha-CLIP adds an alpha convolution to the patch
embedding, IP-CLIP runs the last blocks with per-mask class tokens and an attention mask, and all
of them run at resolutions the model was not trained at. Rather than patching the user's model
(LeGrad's original code monkey-patches it and overwrites its positional embedding), this runner
reads the model's parameters and computes those passes itself. The model is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from regionsearch.errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockTrace:
    """What one transformer block saw and produced; ``probs`` only when asked for."""

    inputs: torch.Tensor  # (B, n, C) tokens entering the block
    outputs: torch.Tensor  # (B, n, C) tokens leaving the block
    probs: torch.Tensor | None  # (B, heads, n, n) post-softmax attention


def layer_scale(module: nn.Module) -> torch.Tensor | None:
    """The per-channel gamma of an open_clip ``LayerScale``, or None for ``nn.Identity``."""
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise UnsupportedModelError(f"unsupported layer-scale module {type(module).__name__}")
    return gamma


class ViTRunner:
    """Runs an open_clip ViT image tower piece by piece, at any input size, without mutating it.

    Supports the standard open_clip ``VisionTransformer`` (class-token pooling, learnable
    positional embedding, ``ResidualAttentionBlock`` with ``nn.MultiheadAttention``), which covers
    OpenAI CLIP, LAION/DataComp ViTs and this project's reference model. Anything else raises
    :class:`UnsupportedModelError` with the reason.
    """

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self._check_supported(visual)
        self.patch_size: tuple[int, int] = tuple(visual.conv1.kernel_size)  # type: ignore[assignment]
        self.width: int = visual.conv1.out_channels
        self.blocks = list(visual.transformer.resblocks)
        self.heads: int = self.blocks[0].attn.num_heads
        self.embed_dim: int = visual.proj.shape[1]
        self.native_grid: tuple[int, int] = tuple(visual.grid_size)  # type: ignore[assignment]
        self._pos_cache: dict[tuple[tuple[int, int], torch.device, torch.dtype], torch.Tensor] = {}

    @staticmethod
    def _check_supported(visual: nn.Module) -> None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        name = type(visual).__name__
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"region embedders need an open_clip VisionTransformer image tower, got {name} "
                "(timm, ConvNeXt and ResNet towers are not supported)"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModelError("attentional-pooling ViTs (CoCa) are not supported")
        if visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise UnsupportedModelError(
                f"only class-token pooled ViTs are supported (pool_type={visual.pool_type!r})"
            )
        if visual.proj is None:
            raise UnsupportedModelError("the ViT has no output projection to the joint space")
        for block in visual.transformer.resblocks:
            if type(block) is not ResidualAttentionBlock or not isinstance(
                block.attn, nn.MultiheadAttention
            ):
                raise UnsupportedModelError(
                    f"unsupported transformer block {type(block).__name__}: only open_clip's "
                    "ResidualAttentionBlock with nn.MultiheadAttention is supported"
                )
            if not block.attn.batch_first:
                raise UnsupportedModelError("sequence-first attention is not supported")

    # ---------------------------------------------------------------- embedding
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of ``height x width`` pixels."""
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {ph}x{pw}"
            )
        return height // ph, width // pw

    def positional_embedding(
        self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The positional embedding for ``grid``: the model's own at its native grid, otherwise
        resampled exactly as the MaskInversion/LeGrad authors do (timm's
        ``resample_abs_pos_embed``: bicubic with antialiasing, class token kept).

        Plain ``F.interpolate`` bicubic uses another kernel (a = -0.75 instead of the antialiased
        path's -0.5), which moves LeGrad maps by up to 7e-2 at 448 px on CLIP ViT-B/16.
        Cached per (grid, device, dtype) on this runner, never written back to the model. While
        the embedding is being trained (it requires grad, grad mode on) the live parameter is used
        uncached, so a training loss built on this runner reaches it.
        """
        live = self.visual.positional_embedding
        if live.requires_grad and torch.is_grad_enabled() and grid == self.native_grid:
            return live.to(device=device, dtype=dtype)
        key = (grid, device, dtype)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        pos = self.visual.positional_embedding.detach()
        if grid != self.native_grid:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(
                pos[None],
                new_size=list(grid),
                old_size=list(self.native_grid),
                num_prefix_tokens=1,
                interpolation="bicubic",
                antialias=True,
            )[0]
        result = pos.to(device=device, dtype=dtype)
        self._pos_cache[key] = result
        return result

    def embed(
        self, pixels: torch.Tensor, extra_patch_embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch-embed ``(B, 3, H, W)`` pixels into ``(B, 1 + gh*gw, C)`` tokens after ``ln_pre``.

        ``extra_patch_embedding`` (``(B, C, gh, gw)``) is added to the patch convolution's
        output before the class token is prepended: Alpha-CLIP's alpha convolution enters here.
        """
        visual = self.visual
        grid = self.grid_for(pixels.shape[-2], pixels.shape[-1])
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
        if extra_patch_embedding is not None:
            x = x + extra_patch_embedding.to(x.dtype)
        x = x.flatten(2).transpose(1, 2)  # (B, n-1, C)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid, x.device, x.dtype)
        return visual.ln_pre(x)

    # ---------------------------------------------------------------- blocks
    def attention(
        self,
        index: int,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        return_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head self-attention of block ``index`` on already-normalised tokens ``x``.

        ``attn_mask`` is additive (``-inf`` blocks), broadcastable to ``(B, heads, n, n)``.
        Returns the projected output and, if asked, the post-softmax probabilities (under grad
        mode these are always differentiable, even when nothing upstream requires grad).
        """
        attn = self.blocks[index].attn
        batch, tokens, channels = x.shape
        head_dim = channels // self.heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (
            t.reshape(batch, tokens, self.heads, head_dim).transpose(1, 2)
            for t in qkv.chunk(3, dim=-1)
        )
        probs = None
        if return_probs:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            probs = scores.softmax(dim=-1)
            if torch.is_grad_enabled() and not probs.requires_grad:
                # Frozen model, constant input: make the probabilities a leaf so callers can
                # still differentiate with respect to them (LeGrad's quantity of interest).
                probs = probs.detach().requires_grad_(True)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias), probs

    def block(
        self,
        index: int,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        return_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One residual block: ``x + ls1(attn(ln1 x))`` then ``+ ls2(mlp(ln2 x))``."""
        blk = self.blocks[index]
        attn_out, probs = self.attention(index, blk.ln_1(x), attn_mask, return_probs)
        x = x + blk.ls_1(attn_out)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x, probs

    def run_blocks(
        self,
        x: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start .. stop-1`` (Python slice semantics) on tokens ``x``."""
        for index in range(len(self.blocks))[start:stop]:
            x, _ = self.block(index, x, attn_mask)
        return x

    def trace(
        self, x: torch.Tensor, start: int, trace_from: int, need_probs: bool = True
    ) -> list[BlockTrace]:
        """Run blocks from ``start`` to the end, recording blocks ``>= trace_from``."""
        traces: list[BlockTrace] = []
        for index in range(start, len(self.blocks)):
            record = index >= trace_from
            out, probs = self.block(index, x, return_probs=record and need_probs)
            if record:
                traces.append(BlockTrace(inputs=x, outputs=out, probs=probs))
            x = out
        return traces

    # ---------------------------------------------------------------- head
    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj``: maps ``(..., C)`` tokens into the joint space (not normalised)."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def encode(
        self, pixels: torch.Tensor, extra_patch_embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ordinary CLIP image embedding ``(B, d)`` (not normalised) at any input size."""
        x = self.run_blocks(self.embed(pixels, extra_patch_embedding))
        return self.head(x[:, 0])
