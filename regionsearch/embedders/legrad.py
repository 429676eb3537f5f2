"""LeGrad explainability maps, by plain autograd and by gradient decomposition.

LeGrad scores a query vector ``l`` against a block's mean-pooled output token pushed through the
model head, ``s = <l, normalize(ln_post(mean_i z_i) @ proj)>``, and explains ``s`` by the ReLU of
its gradient with respect to that block's attention probabilities ``A`` (heads x n x n), averaged
over heads and query rows, class-token column dropped (method.md §2).

Two implementations of the same number:

* :func:`relevance_autograd` differentiates through the block with autograd (the reference; with
  ``create_graph=True`` it is what the naive MaskInversion double-backpropagates through);
* :func:`relevance_decomposed` uses that ``s`` is linear in ``l``. With ``g_i`` the gradient of
  ``s`` at the output of token ``i``'s attention branch, ``ds/dA_h[i, j] = <W_o,h^T (gamma_1 g_i),
  v_h[j]>`` and ``g_i = (q + J_MLP,i^T q) / n`` with ``q = J_post^T l``. :class:`BlockFactors`
  caches everything that depends only on the image (``J_post``, the values ``v``, the MLP's
  ``gelu'`` and the LayerNorm statistics), so each new query costs a few matrix products — per
  mask ``n x 4C x C`` for the MLP Jacobian, ``n x C x C`` for the head projection and ``n^2 x C``
  for the attention-shaped gradient — and never passes through the transformer again. The
  ``(M, heads, n, n)`` gradient is the memory peak; it is computed in chunks of masks (and, when
  asked, recomputed in the backward pass), so memory is bounded by the chunk size, not by M.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from regionsearch.backbone.vit import ViTRunner, layer_scale


def mean_token_score_features(runner: ViTRunner, outputs: torch.Tensor) -> torch.Tensor:
    """``normalize(head(mean over all tokens))`` for block outputs ``(B, n, C)`` → ``(B, d)``."""
    return F.normalize(runner.head(outputs.mean(dim=1)), dim=-1)


def relevance_from_attention_grad(grad: torch.Tensor) -> torch.Tensor:
    """``(B, heads, n, n)`` gradient → ``(B, n-1)``: ReLU, mean over heads and rows, drop CLS.

    Heads first, then rows, in the authors' order (float32 sums depend on it).
    """
    return grad.clamp(min=0).mean(dim=1).mean(dim=1)[:, 1:]


def relevance_to_maps(
    relevance: torch.Tensor,
    grid: tuple[int, int],
    input_size: tuple[int, int],
    size: Sequence[int] | None = None,
) -> torch.Tensor:
    """``(B, n-1)`` patch relevance → ``(B, H, W)`` maps in [0, 1], as the authors compute them.

    The grid is bilinearly upsampled to the network's ``input_size``, min-max normalised per
    map there, and only then, when ``size`` differs, bilinearly resized to ``size`` (the mask's or
    the photo's resolution). The order matters: normalising after a resize to another size
    gives another map.
    """
    maps = relevance.reshape(relevance.shape[0], 1, *grid)
    maps = F.interpolate(maps, size=tuple(input_size), mode="bilinear", align_corners=False)
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    high = flat.amax(dim=1).view(-1, 1, 1, 1)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    if size is not None and tuple(size) != tuple(input_size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps[:, 0]


def relevance_autograd(
    runner: ViTRunner,
    index: int,
    inputs: torch.Tensor,
    queries: torch.Tensor,
    create_graph: bool = False,
) -> torch.Tensor:
    """Reference LeGrad relevance of block ``index`` by autograd.

    Args:
        inputs: ``(B, n, C)`` tokens entering the block, one row per query (repeat the image).
        queries: ``(B, d)`` query vectors (normalised or not; the score is linear in them).
        create_graph: keep the graph so the relevance can be differentiated w.r.t. ``queries``.

    Returns:
        ``(B, n-1)`` relevance per patch.
    """
    with torch.enable_grad():
        outputs, probs = runner.block(index, inputs, return_probs=True)
        features = mean_token_score_features(runner, outputs)
        score = (features * queries).sum()
        (grad,) = torch.autograd.grad(score, probs, create_graph=create_graph)
    return relevance_from_attention_grad(grad)


@dataclass
class BlockFactors:
    """The image-only factors of LeGrad's gradient for one block of one image."""

    j_post: torch.Tensor  # (d, C): Jacobian of normalize(head(mean token)) at the mean token
    value_t: torch.Tensor  # (heads, dh, n): attention values, transposed for the last product
    w_out: torch.Tensor  # (C, C): out-projection with the attention layer scale folded in
    gelu_prime: torch.Tensor  # (n, 4C): activation derivative at the MLP's hidden pre-activation
    xhat: torch.Tensor  # (n, C): ln_2-normalised input of the MLP branch
    inv_sigma: torch.Tensor  # (n, 1): 1 / std used by ln_2
    w_fc: torch.Tensor  # (4C, C): c_fc weight
    w_proj: torch.Tensor  # (C, 4C): c_proj weight
    ln2_weight: torch.Tensor  # (C,)
    gamma_2: torch.Tensor | None  # (C,) or None: layer scale of the MLP branch
    features: torch.Tensor  # (d,): the block's normalised score features (for reference)

    @property
    def tokens(self) -> int:
        return self.xhat.shape[0]

    @classmethod
    @torch.no_grad()
    def compute(cls, runner: ViTRunner, index: int, inputs: torch.Tensor) -> BlockFactors:
        """Factors of block ``index`` for one image's block input ``inputs`` ``(1, n, C)``."""
        if inputs.ndim != 3 or inputs.shape[0] != 1:
            raise ValueError(f"expected one image's tokens (1, n, C), got {tuple(inputs.shape)}")
        block = runner.blocks[index]
        y = inputs[0]
        tokens, channels = y.shape
        heads = runner.heads
        head_dim = channels // heads

        normed = block.ln_1(y)
        value = F.linear(
            normed,
            block.attn.in_proj_weight[2 * channels :],
            block.attn.in_proj_bias[2 * channels :]
            if block.attn.in_proj_bias is not None
            else None,
        )
        value_t = value.reshape(tokens, heads, head_dim).permute(1, 2, 0)  # (h, dh, n)
        w_out = block.attn.out_proj.weight
        gamma_1 = layer_scale(block.ls_1)
        if gamma_1 is not None:
            w_out = gamma_1[:, None] * w_out

        attn_out, _ = runner.attention(index, normed[None])
        x1 = y + block.ls_1(attn_out[0])
        ln2 = block.ln_2
        mean = x1.mean(dim=-1, keepdim=True)
        var = x1.var(dim=-1, keepdim=True, unbiased=False)
        inv_sigma = torch.rsqrt(var + ln2.eps)
        xhat = (x1 - mean) * inv_sigma
        hidden = block.mlp.c_fc(ln2(x1))
        with torch.enable_grad():
            hidden_var = hidden.detach().requires_grad_(True)
            (gelu_prime,) = torch.autograd.grad(block.mlp.gelu(hidden_var).sum(), hidden_var)
        outputs = x1 + block.ls_2(block.mlp(ln2(x1)))
        mean_token = outputs.mean(dim=0)

        def post(token: torch.Tensor) -> torch.Tensor:
            return F.normalize(runner.head(token), dim=-1)

        with torch.enable_grad():
            j_post = torch.autograd.functional.jacobian(post, mean_token, vectorize=True)
        return cls(
            j_post=j_post,
            value_t=value_t.contiguous(),
            w_out=w_out,
            gelu_prime=gelu_prime,
            xhat=xhat,
            inv_sigma=inv_sigma,
            w_fc=block.mlp.c_fc.weight,
            w_proj=block.mlp.c_proj.weight,
            ln2_weight=ln2.weight,
            gamma_2=layer_scale(block.ls_2),
            features=post(mean_token),
        )

    def _ln_adjoint(self, w: torch.Tensor) -> torch.Tensor:
        """Apply ln_2's normalisation Jacobian (symmetric, per token) to ``(m, n, C)``."""
        return (
            w
            - w.mean(dim=-1, keepdim=True)
            - self.xhat * (w * self.xhat).mean(dim=-1, keepdim=True)
        ) * self.inv_sigma

    def attention_output_gradients(self, q: torch.Tensor) -> torch.Tensor:
        """``(m, C)`` gradients at the mean token → ``(m, h, n, dh)`` gradients at each head's
        attention output ``o_h[i]``: ``W_o,h^T gamma_1 (q + J_MLP,i^T q) / n``. Linear in ``q``."""
        heads, head_dim, tokens = self.value_t.shape
        scaled = q * self.gamma_2 if self.gamma_2 is not None else q
        hidden = (scaled @ self.w_proj)[:, None, :] * self.gelu_prime  # (m, n, 4C)
        mlp_back = self._ln_adjoint((hidden @ self.w_fc) * self.ln2_weight)  # (m, n, C)
        per_token = (q[:, None, :] + mlp_back) / tokens
        out = per_token @ self.w_out  # (m, n, C)
        return out.reshape(-1, tokens, heads, head_dim).transpose(1, 2)

    def attention_output_gradients_adjoint(self, grad_out: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`attention_output_gradients`: ``(m, h, n, dh)`` → ``(m, C)``.

        Written out by hand because the map is linear: autograd would keep its ``(m, n, 4C)``
        intermediates alive and spend as long on bookkeeping as on the matrix products.
        """
        batch, heads, tokens, head_dim = grad_out.shape
        per_token = grad_out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        per_token = (per_token @ self.w_out.T) / tokens  # (m, n, C)
        hidden = (self._ln_adjoint(per_token) * self.ln2_weight) @ self.w_fc.T  # (m, n, 4C)
        scaled = (hidden * self.gelu_prime).sum(dim=1) @ self.w_proj.T  # (m, C)
        if self.gamma_2 is not None:
            scaled = scaled * self.gamma_2
        return per_token.sum(dim=1) + scaled

    def chunk_relevance(
        self, q: torch.Tensor, workspace: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(m, C)`` → ``(m, n-1)`` relevance; materialises the ``(m, h, n, n)`` gradient, in
        the first ``m`` rows of ``workspace`` when given (see :meth:`gradient_workspace`)."""
        return _FactoredRelevance.apply(q, self, workspace)

    def gradient_workspace(self, rows: int) -> torch.Tensor:
        """Room for the ``(rows, h, n, n)`` gradient, reusable across chunks and steps.

        On the CPU a fresh tensor of this size (158 MB for 16 masks at 224 px on the reference
        model) is paged in anew at every call, which cost more than the product that fills it.
        Every chunk computed into the workspace overwrites the one before; autograd's version
        check then makes a backward through an overwritten chunk fail loudly, so it suits
        callers that backpropagate each chunk before computing the next (MaskInversion).
        """
        heads, _, tokens = self.value_t.shape
        return self.value_t.new_empty((rows, heads, tokens, tokens))


class _FactoredRelevance(torch.autograd.Function):
    """ReLU-mean of ``ds/dA`` from the factors, with a hand-written backward.

    The ``(m, h, n, n)`` gradient is the only large tensor. The forward keeps its 0/1 sign
    pattern; the backward folds the incoming gradient into the small ``(m, h, n, dh)`` value
    operand, so it is a single batched matrix product over the sign pattern, with no
    elementwise pass over the large tensor; the linear part goes back through the hand-written
    adjoint instead of autograd's copies of every intermediate.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: torch.Tensor, factors: BlockFactors, workspace: torch.Tensor | None
    ) -> torch.Tensor:
        out = None if workspace is None else workspace[: q.shape[0]]
        grad = torch.matmul(factors.attention_output_gradients(q), factors.value_t, out=out)
        grad.clamp_(min=0)  # (m, h, n, n)
        relevance = grad.mean(dim=1).mean(dim=1)[:, 1:]  # the authors' order of means
        # The sign pattern overwrites the gradient in place: a second tensor of this size
        # would cost as much in fresh pages as the sign itself.
        ctx.save_for_backward(grad.sign_())
        ctx.factors = factors
        return relevance

    @staticmethod
    def backward(ctx, grad_relevance: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (positive,) = ctx.saved_tensors
        factors: BlockFactors = ctx.factors
        _, heads, tokens, _ = positive.shape
        per_key = F.pad(grad_relevance, (1, 0)) / (heads * tokens)  # CLS column gets nothing
        values = factors.value_t.transpose(-1, -2)[None] * per_key[:, None, :, None]
        grad_out = positive @ values  # (m, h, n, dh)
        return factors.attention_output_gradients_adjoint(grad_out), None, None


def relevance_decomposed(
    factors: BlockFactors,
    queries: torch.Tensor,
    chunk_size: int = 16,
    checkpoint_chunks: bool = True,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """LeGrad relevance ``(M, n-1)`` of M query vectors ``(M, d)`` from cached image factors.

    Differentiable w.r.t. ``queries``. With ``checkpoint_chunks`` each chunk is recomputed in
    the backward pass, so peak memory is one chunk's ``(chunk, h, n, n)`` gradient tensor even
    when all M rows are backpropagated together; callers that already backpropagate chunk by
    chunk (MaskInversion) turn it off to save the recomputation, and may pass a
    ``workspace`` (:meth:`BlockFactors.gradient_workspace`) for the gradient of every chunk.
    """
    q = queries.to(factors.j_post.dtype) @ factors.j_post  # (M, C)
    pieces = []
    for start in range(0, q.shape[0], chunk_size):
        piece = q[start : start + chunk_size]
        if piece.requires_grad and checkpoint_chunks:
            pieces.append(checkpoint(factors.chunk_relevance, piece, use_reentrant=False))
        else:
            pieces.append(factors.chunk_relevance(piece, workspace))
    return torch.cat(pieces)


class LeGrad:
    """Explainability maps for text or vectors on images, batched over images and queries.

    Uses the decomposition: one forward pass per image, then any number of query vectors per
    hooked block for the cost of a few matrix products. ``layers`` defaults to the last two
    blocks, the authors' default for explaining (their ``LeWrapper(layer_index=-2)``);
    MaskInversion uses the last block only.
    """

    def __init__(self, runner: ViTRunner, layers: int = 2, chunk_size: int = 16) -> None:
        if not 1 <= layers <= len(runner.blocks):
            raise ValueError(f"layers must be in 1..{len(runner.blocks)}, got {layers}")
        self.runner = runner
        self.layers = layers
        self.chunk_size = chunk_size

    @torch.no_grad()
    def relevance(self, pixels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images x ``(Q, d)`` queries → ``(B, Q, n-1)`` summed relevance."""
        runner = self.runner
        first = len(runner.blocks) - self.layers
        results = []
        workspace = None  # without gradients no chunk needs its tensor past its own means
        for image in pixels:
            tokens = runner.run_blocks(runner.embed(image[None]), 0, first)
            traces = runner.trace(tokens, first, first, need_probs=False)
            per_block = []
            for k, trace in enumerate(traces):
                factors = BlockFactors.compute(runner, first + k, trace.inputs)
                if workspace is None:
                    workspace = factors.gradient_workspace(min(self.chunk_size, len(queries)))
                per_block.append(
                    relevance_decomposed(factors, queries, self.chunk_size, workspace=workspace)
                )
            results.append(sum(per_block))
        return torch.stack(results)

    def maps(
        self, pixels: torch.Tensor, queries: torch.Tensor, size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Min-max normalised maps ``(B, Q, H, W)`` at ``size`` (default: the input size).

        Normalised at the input size, then resized to ``size`` (see :func:`relevance_to_maps`).
        """
        height, width = pixels.shape[-2:]
        grid = self.runner.grid_for(height, width)
        relevance = self.relevance(pixels, queries)
        batch, count = relevance.shape[:2]
        out = relevance_to_maps(relevance.flatten(0, 1), grid, (height, width), size)
        return out.reshape(batch, count, *out.shape[-2:])
