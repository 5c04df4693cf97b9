"""Replacement forwards for OpenFold's Evoformer, extra-MSA and template-pair modules.

Each function here has the stock module's ``forward`` signature and is bound to one instance
by :func:`fastfold_plugin.enable`. It reads the OpenFold module's own parameters (nothing is
renamed, moved or copied) and routes the computation through the op table
(``fastfold_plugin.kernels``): ``self._fastfold_patch.ops_for(x)`` returns the reference or the
Triton ops for the tensor's device.

The math and its order follow OpenFold 0.0.1 exactly, so that the reference ops reproduce stock
results (and stock dropout masks: they are drawn from torch's RNG in OpenFold's order):

- MSA row attention with pair bias, MSA column attention, triangle attention (starting and
  ending node) and template pointwise attention all call ``ops.attention`` (gated, biased);
- ``MSAColumnGlobalAttention`` calls ``ops.layer_norm_torch`` and ``ops.global_attention``;
- the transitions call ``ops.transition``; the triangle updates ``ops.triangle_multiplication``;
  the outer product mean ``ops.outer_product_mean`` (in fp32 under fp16 autocast, as OpenFold);
- the blocks apply dropout and the residual add through ``ops.dropout_add``.

Chunking (``chunk_size``) splits the batch-like leading dimension that OpenFold's own chunking
would split, so peak memory stays bounded the same way; under OpenFold's in-place inference path
(``inplace_safe``) residual adds happen in place.
"""
import math
import operator
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from openfold.model.evoformer import (
    EvoformerBlock,
    EvoformerBlockCore,
    ExtraMSABlock,
    MSATransition,
)
from openfold.model.msa import MSAAttention, MSAColumnAttention, MSAColumnGlobalAttention
from openfold.model.outer_product_mean import OuterProductMean
from openfold.model.pair_transition import PairTransition
from openfold.model.primitives import Attention
from openfold.model.template import TemplatePairStackBlock, TemplatePointwiseAttention
from openfold.model.triangular_attention import TriangleAttention
from openfold.model.triangular_multiplicative_update import TriangleMultiplicativeUpdate
from openfold.utils.precision_utils import is_fp16_enabled
from openfold.utils.tensor_utils import add, flatten_final_dims, permute_final_dims

from fastfold_plugin.kernels._triton_utils import autocast_dtype
from fastfold_plugin.kernels.triangle_multiplication import TriMulWeights


class UnsupportedOption(ValueError):
    """An OpenFold option that fastfold-plugin's forwards do not implement."""


def _reject_offload(flag: bool) -> None:
    if flag:
        raise UnsupportedOption(
            "fastfold-plugin does not implement OpenFold's offload_inference (CPU offloading "
            "between sub-modules); set config.globals.offload_inference = False (and do not use "
            "long_sequence_inference=True), or disable the plugin for this model."
        )


def _mask_bias(mask: torch.Tensor, inf: float) -> torch.Tensor:
    """OpenFold's additive key mask: [*, Q, K] mask -> [*, Q, 1, 1, K] bias."""
    return (inf * (mask - 1))[..., :, None, None, :]


def cast_once(x: torch.Tensor) -> torch.Tensor:
    """Inference under autocast: an fp32 activation that several projections read, rounded to
    the autocast dtype once. Autocast caches only its casts of leaf tensors (the weights), so
    each Linear would round the same activation again (q, k, v and the gate: four casts of a
    LayerNorm output, which is fp32 under autocast); the values are the same. With gradients
    on, autocast's casts stay: their backwards sum the projections' gradients in fp32."""
    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return x
    dt = autocast_dtype(x.device.type)
    return x if dt is None or dt == torch.float32 else x.to(dt)


def head_bias(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A pair tensor's per-head attention bias, ``x @ weight^T`` for x [*, Q, K, C] (the bias
    Linears have no bias term), as [*, Q, H, K].

    On GPUs it is computed in that layout: keys contiguous, so its ``.transpose(-2, -3)`` is the
    attention's [*, H, Q, K] bias as it is. OpenFold's [*, Q, K, H] output permuted to
    [*, H, Q, K] has key stride H, and the attention op copies such a bias on every call (every
    chunk). The GEMM is batched over the rows so that x is read through its strides (a 2-D
    weight would make matmul fold x's rows into one matrix, a copy when x is a transposed view,
    and transpose the product back). On the CPU, where the reference ops follow stock OpenFold
    op for op, it is OpenFold's Linear, transposed: the same rounding as stock (a GEMM of another
    shape rounds differently, and the whole-model training gradients amplify that)."""
    if not x.is_cuda:
        return F.linear(x, weight).transpose(-1, -2)
    return _HeadBias.apply(x, weight, autocast_dtype(x.device.type))


class _HeadBias(torch.autograd.Function):
    """``head_bias``'s GEMMs on GPUs (`dt`: the autocast dtype, or None), with their gradients
    laid out as their inputs. Forward: the weight rounded to `dt` (under autocast; once, before
    it is broadcast over the rows), then one GEMM batched over the rows. Backward: dx [*, Q, K, C]
    as one GEMM batched over the rows, dout^T @ weight, which writes it in x's own layout
    (autograd's backward of the forward's GEMM gives it as a transposed view, [*, Q, C, K] seen
    as [*, Q, K, C], which the LayerNorm's backward then copies: a pair-sized transpose per
    bias, three per Evoformer block step); dweight as one GEMM over all Q * K positions,
    rounded once to `dt` like the stock Linear's, then to the weight's dtype."""

    @staticmethod
    def forward(ctx, x, weight, dt):
        w = weight.to(dt) if dt is not None else weight
        x = x.to(dt) if dt is not None else x
        xt = x.transpose(-1, -2)  # [*, Q, C, K]
        with torch.autocast(x.device.type, enabled=False):
            out = torch.matmul(w.expand(xt.shape[:-2] + w.shape), xt)
        ctx.save_for_backward(x, w)
        ctx.w_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.to(w.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(g.transpose(-1, -2), w)  # [*, Q, K, H] @ [H, C]
        if ctx.needs_input_grad[1]:
            heads = w.shape[0]
            g2 = g.movedim(-2, 0).reshape(heads, -1)  # [H, * Q K]: a view of a dense [H, Q, K]
            dw = (g2 @ x.reshape(-1, x.shape[-1])).to(ctx.w_dtype)
        return dx, dw, None


def _no_hooks(mod: nn.Module) -> bool:
    """Whether calling `mod` runs its forward alone: no forward (pre-)hooks, local or global."""
    return (not mod._forward_hooks and not mod._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks)


def _plain_linear(mod: nn.Module) -> bool:
    """Whether calling `mod` is ``F.linear`` of its own weight and bias: an ``nn.Linear``
    forward (OpenFold's Linear keeps torch's) with no module hooks, local or global."""
    return type(mod).forward is nn.Linear.forward and _no_hooks(mod)


def _project(ops, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``: the op table's ``linear`` (its bias gradient fused) for a plain Linear, the
    module itself otherwise (a wrapper or a hook sees its call as in stock OpenFold)."""
    return ops.linear(x, mod.weight, mod.bias) if _plain_linear(mod) else mod(x)


def _in_projections(mha: Attention) -> tuple:
    """`mha`'s Linears that read its input in self-attention: q, k, v and the gate."""
    lins = (mha.linear_q, mha.linear_k, mha.linear_v)
    return lins if mha.linear_g is None else lins + (mha.linear_g,)


def _packable(mha: Attention, ops) -> bool:
    """Whether `mha`'s self-attention runs its input projections as one GEMM into one packed
    tensor (``ops.linear_packed``) that the attention reads in place (``ops.attention_packed``):
    the Triton ops, every projection a plain Linear (no hooks, torch's forward). The reference
    ops keep OpenFold's four Linears."""
    return ops.backend == "triton" and all(_plain_linear(m) for m in _in_projections(mha))


def _n_inputs(mha: Attention, ops) -> int:
    """How many readers of `mha`'s input a self-attention has: the packed projection, or q, the
    gate, k and v."""
    return 1 if _packable(mha, ops) else len(_in_projections(mha))


def _mha(mha: Attention, ops, q_x: Optional[torch.Tensor], kv_x: Optional[torch.Tensor],
         mask_bias: Optional[torch.Tensor], pair_bias: Optional[torch.Tensor],
         xs: Optional[tuple] = None, columns: bool = False) -> torch.Tensor:
    """OpenFold's Attention (projections, gated biased attention, output projection).

    q_x [*, Q, C_q], kv_x [*, K, C_k]; the biases broadcast to [*, H, Q, K]. Self-attention may
    pass, instead of q_x and kv_x, `xs`: the ``_n_inputs(mha, ops)`` projections' inputs (q,
    the gate, k, v; or the one input of the packed projection, see ``_packable``), as
    ``layer_norm_fanout`` hands them out. With `columns`, the inputs are
    [*, Q, B, C] and the attention runs along dim -3 for each b (the MSA column attention on
    the MSA as it lies): the heads are [*, B, H, Q, C_hidden] views of the projections, the
    biases broadcast to [*, B, H, Q, K], and the op lays its output out like the gate, so the
    projections on both sides read and write [*, Q, B, C] rows with no transposed copies.
    """
    h = mha.no_heads
    if (len(xs) == 1) if xs is not None else (kv_x is q_x and _packable(mha, ops)):
        # one GEMM for q, k, v and the gate; the attention reads its parts and writes their
        # gradients into one buffer, whose input gradient is one GEMM again
        lins = _in_projections(mha)
        y = ops.linear_packed(xs[0] if xs is not None else cast_once(q_x),
                              [m.weight for m in lins], [m.bias for m in lins])
        o = ops.attention_packed(y, h, mask_bias, pair_bias, q_div=math.sqrt(mha.c_hidden),
                                 gated=mha.linear_g is not None, columns=columns)
        if columns:
            o = o.transpose(-3, -4)
        return _project(ops, mha.linear_o, flatten_final_dims(o, 2))
    n_q = 2 if mha.linear_g is not None else 1
    if xs is not None:
        xq, xkv = xs[:n_q], xs[n_q:]
    elif kv_x is q_x:
        # the projections' inputs: q (and the gate) read q_x, k and v read kv_x; under autocast
        # each input is rounded once for all of them, its gradient one fp32 sum (``cast_fanout``)
        xs = ops.cast_fanout(cast_once(q_x), n_q + 2)
        xq, xkv = xs[:n_q], xs[n_q:]
    else:
        xq, xkv = ops.cast_fanout(cast_once(q_x), n_q), ops.cast_fanout(cast_once(kv_x), 2)
    q = mha.linear_q(xq[0])
    k = mha.linear_k(xkv[0])
    v = mha.linear_v(xkv[1])
    if columns:  # [*, B, H, Q/K, C_hidden] views of the [*, Q/K, B, H * C_hidden] projections
        q, k, v = (t.view(t.shape[:-1] + (h, -1)).movedim(-4, -2) for t in (q, k, v))
    else:  # [*, H, Q/K, C_hidden] views of the projections
        q = q.view(q.shape[:-1] + (h, -1)).transpose(-2, -3)
        k = k.view(k.shape[:-1] + (h, -1)).transpose(-2, -3)
        v = v.view(v.shape[:-1] + (h, -1)).transpose(-2, -3)
    gate = None
    if mha.linear_g is not None:
        g = _project(ops, mha.linear_g, xq[1])
        gate = g.view(g.shape[:-1] + (h, -1))
        if columns:
            gate = gate.transpose(-3, -4)
    q_x = kv_x = xq = xkv = xs = None  # the rounded copies are not needed past the projections
    # [*, Q, H, C_hidden]
    # OpenFold's q / sqrt(c_hidden): inside the op (the Triton kernels scale the fp32 logits)
    o = ops.attention(q, k, v, mask_bias=mask_bias, pair_bias=pair_bias, gate=gate,
                      q_div=math.sqrt(mha.c_hidden))
    if columns:
        o = o.transpose(-3, -4)
    return _project(ops, mha.linear_o, flatten_final_dims(o, 2))


def attention_forward(self: Attention, q_x, kv_x, biases=None, use_memory_efficient_kernel=False,
                      use_lma=False, lma_q_chunk_size=None, lma_kv_chunk_size=None,
                      use_flash=False, flash_mask=None):
    """Attention.forward: up to two additive biases go to the op; more are summed first."""
    if use_flash:
        raise UnsupportedOption("use_flash cannot be combined with fastfold-plugin; unset "
                                "config.globals.use_flash (the plugin's attention is flash-style).")
    biases = list(biases or [])
    if len(biases) > 2:
        biases = biases[:1] + [sum(biases[1:])]
    biases += [None] * (2 - len(biases))
    return _mha(self, self._fastfold_patch.ops_for(q_x), q_x, kv_x, biases[0], biases[1])


def _msa_attention(self: MSAAttention, ops, m, z, mask, chunk_size, carry: bool = False,
                   columns: bool = False):
    """The MSA attention's update of m (row attention, with the pair bias from z when the module
    has one). With `carry` (no chunks), ``(update, m, z)``: m and z as their LayerNorms hand them
    back (``layer_norm_fanout``), for the residual adds that read them next, whose gradients the
    LayerNorms' backward then adds (z is returned as given when no bias is formed). With
    `columns` (no chunks): the attention runs along N_seq for each residue, on m [*, N_seq,
    N_res, C] as it lies (``_mha``'s `columns`): the column attention's update."""
    n_seq, n_res = m.shape[-3:-1]
    if mask is None:
        mask = m.new_ones(m.shape[:-3] + (n_seq, n_res))
    # [*, N_seq, 1, 1, N_res]; with columns [*, N_res, 1, 1, N_seq]
    mask_bias = _mask_bias(mask.transpose(-1, -2) if columns else mask, self.inf)
    pair_bias = None
    if self.pair_bias and z is not None:
        lnz = self.layer_norm_z
        zs = ops.layer_norm_fanout(z, lnz.weight, lnz.bias, lnz.eps, 1, carry)
        if carry:
            z = zs[1]
        # [*, 1, H, N_res, N_res]
        pair_bias = head_bias(zs[0], self.linear_z.weight).transpose(-2, -3).unsqueeze(-4)
    ln = self.layer_norm_m
    n_in = _n_inputs(self.mha, ops)

    def fn(m_chunk, bias_chunk, pair_bias, carry=False):
        xs = ops.layer_norm_fanout(m_chunk, ln.weight, ln.bias, ln.eps, n_in, carry)
        o = _mha(self.mha, ops, None, None, bias_chunk, pair_bias, xs=xs[:n_in], columns=columns)
        return (o, xs[n_in]) if carry else o

    # rows of the MSA are independent: chunk along N_seq (dim -3 of m, -4 of the bias)
    if (carry or columns) and chunk_size is not None:
        raise ValueError("_msa_attention: carry and columns need chunk_size None")
    if carry:
        o, m = fn(m, mask_bias, pair_bias, carry=True)
        return o, m, z
    if chunk_size is None:
        return fn(m, mask_bias, pair_bias)
    outs = []
    for s in range(0, n_seq, chunk_size):
        e = min(s + chunk_size, n_seq)
        outs.append(fn(m[..., s:e, :, :], mask_bias[..., s:e, :, :, :], pair_bias))
    return torch.cat(outs, dim=-3)


def msa_attention_forward(self: MSAAttention, m, z=None, mask=None, chunk_size=None,
                          use_memory_efficient_kernel=False, use_lma=False, use_flash=False,
                          inplace_safe=False, _chunk_logits=None, _checkpoint_chunks=None):
    """MSAAttention.forward (row attention with pair bias, and the core of column attention).

    `use_memory_efficient_kernel`, `use_lma` and `_chunk_logits` select memory-saving variants of
    the same math in OpenFold; the plugin's attention op is itself memory-efficient (flash-style)
    on the Triton backend, so they only change how OpenFold would have computed it.
    """
    if use_flash:
        raise UnsupportedOption("use_flash cannot be combined with fastfold-plugin; unset "
                                "config.globals.use_flash (the plugin's attention is flash-style).")
    ops = self._fastfold_patch.ops_for(m)
    if _chunk_logits is not None and chunk_size is None:
        chunk_size = _chunk_logits
    return _msa_attention(self, ops, m, z, mask, chunk_size)


def msa_column_attention_forward(self: MSAColumnAttention, m, mask=None, chunk_size=None,
                                 use_lma=False, use_flash=False):
    """MSAColumnAttention.forward: row attention of the transposed MSA."""
    if use_flash:
        raise UnsupportedOption("use_flash cannot be combined with fastfold-plugin; unset "
                                "config.globals.use_flash (the plugin's attention is flash-style).")
    return _msa_column_attention(self, self._fastfold_patch.ops_for(m), m, mask, chunk_size)


def _msa_column_attention(self: MSAColumnAttention, ops, m, mask, chunk_size,
                          carry: bool = False):
    """The column attention's update of m; with `carry`, ``(update, m)`` (``_msa_attention``).

    The Triton ops attend along N_seq on m as it lies (``_mha``'s `columns`) when there are no
    chunks; OpenFold's transposes (and the copies they cost around the Linears) remain for
    chunks and for the reference ops, which follow stock op for op."""
    if ops.backend == "triton" and chunk_size is None:
        out = _msa_attention(self._msa_att, ops, m, None, mask, None, carry, columns=True)
        return out[:2] if carry else out
    m = m.transpose(-2, -3)
    if mask is not None:
        mask = mask.transpose(-1, -2)
    if carry:
        o, m, _ = _msa_attention(self._msa_att, ops, m, None, mask, chunk_size, carry=True)
        return o.transpose(-2, -3), m.transpose(-2, -3)
    return _msa_attention(self._msa_att, ops, m, None, mask, chunk_size).transpose(-2, -3)


def msa_column_global_attention_forward(self: MSAColumnGlobalAttention, m, mask=None,
                                        chunk_size=None, use_lma=False):
    """MSAColumnGlobalAttention.forward: torch LayerNorm contract, then global attention."""
    ops = self._fastfold_patch.ops_for(m)
    if mask is None:
        mask = torch.ones(m.shape[:-1], dtype=m.dtype, device=m.device).detach()
    # [*, N_res, N_seq, C_in]
    m = m.transpose(-2, -3)
    mask = mask.transpose(-1, -2)
    ln, ga = self.layer_norm_m, self.global_attention

    def fn(m_chunk, mask_chunk):
        m_chunk = ops.layer_norm_torch(m_chunk, ln.weight, ln.bias, ln.eps)
        return ops.global_attention(
            m_chunk, mask_chunk, ga.linear_q.weight, ga.linear_k.weight, ga.linear_v.weight,
            ga.linear_g.weight, ga.linear_g.bias, ga.linear_o.weight, ga.linear_o.bias,
            ga.no_heads, ga.inf, ga.eps,
        )

    # columns are independent: chunk along N_res (dim -3 of m, -2 of the mask)
    if chunk_size is None:
        m = fn(m, mask)
    else:
        n = m.shape[-3]
        m = torch.cat([fn(m[..., s:s + chunk_size, :, :], mask[..., s:s + chunk_size, :])
                       for s in range(0, n, chunk_size)], dim=-3)
    return m.transpose(-2, -3)


def triangle_attention_forward(self: TriangleAttention, x, mask=None, chunk_size=None,
                               use_memory_efficient_kernel=False, use_lma=False,
                               inplace_safe=False):
    """TriangleAttention.forward (starting node; ending node when `self.starting` is False)."""
    return _triangle_attention(self, self._fastfold_patch.ops_for(x), x, mask, chunk_size)


def _triangle_attention(self: TriangleAttention, ops, x, mask, chunk_size, carry: bool = False):
    """The triangle attention's update of x; with `carry` (no chunks), ``(update, x)``, x as its
    LayerNorm hands it back (see ``_msa_attention``)."""
    if mask is None:
        mask = x.new_ones(x.shape[:-1])
    if not self.starting:
        x = x.transpose(-2, -3)
        mask = mask.transpose(-1, -2)
    # one LayerNorm output for the bias and every chunk's q, gate, k and v (under autocast
    # rounded once, its readers' gradients summed by the LayerNorm's backward)
    n_in = _n_inputs(self.mha, ops)
    xs = ops.layer_norm_fanout(x, self.layer_norm.weight, self.layer_norm.bias,
                               self.layer_norm.eps, n_in + 1, carry)
    # [*, I, 1, 1, J]
    mask_bias = _mask_bias(mask, self.inf)
    # [*, 1, H, I, J]
    triangle_bias = head_bias(xs[n_in], self.linear.weight).transpose(-2, -3).unsqueeze(-4)

    def fn(rows: slice):
        return _mha(self.mha, ops, None, None, mask_bias[..., rows, :, :, :], triangle_bias,
                    xs=tuple(t[..., rows, :, :] for t in xs[:n_in]))

    if chunk_size is None:
        out = fn(slice(None))
    else:
        if carry:
            raise ValueError("_triangle_attention: carry needs chunk_size None")
        n = x.shape[-3]
        out = torch.cat([fn(slice(s, s + chunk_size)) for s in range(0, n, chunk_size)], dim=-3)
    if not self.starting:
        out = out.transpose(-2, -3)
    if carry:
        x = xs[n_in + 1]
        return out, (x if self.starting else x.transpose(-2, -3))
    return out


def template_pointwise_attention_forward(self: TemplatePointwiseAttention, t, z,
                                         template_mask=None, chunk_size=256, use_lma=False):
    """TemplatePointwiseAttention.forward: each pair entry attends over the templates."""
    ops = self._fastfold_patch.ops_for(z)
    if template_mask is None:
        template_mask = t.new_ones(t.shape[:-3])
    # [*, 1, 1, 1, 1, N_templ]
    bias = self.inf * (template_mask[..., None, None, None, None, :] - 1)
    # [*, N_res, N_res, 1, C_z]
    z = z.unsqueeze(-2)
    # [*, N_res, N_res, N_templ, C_t]
    t = permute_final_dims(t, (1, 2, 0, 3))

    def fn(z_chunk, t_chunk):
        return _mha(self.mha, ops, z_chunk, t_chunk, bias, None)

    if chunk_size is not None and not self.training:
        n = z.shape[-4]
        z = torch.cat([fn(z[..., s:s + chunk_size, :, :, :], t[..., s:s + chunk_size, :, :, :])
                       for s in range(0, n, chunk_size)], dim=-4)
    else:
        z = fn(z, t)
    return z.squeeze(-2)


def _transition(self, ops, x, mask, chunk_size, residual: bool = False,
                update: Optional[torch.Tensor] = None):
    """The transition's update of x; with `residual` (no chunks), x + that update: the blocks'
    residual add, which the op fuses with its mask multiply (and whose gradient its LayerNorm's
    backward kernel adds to dx); with `update` too, the same on x + update (the block's previous
    residual add, done by the op's LayerNorm kernel)."""
    if mask is None:
        mask = x.new_ones(x.shape[:-1])
    mask = mask.unsqueeze(-1)
    ln = self.layer_norm

    def fn(x_chunk, mask_chunk, residual=False, update=None):
        return ops.transition(x_chunk, mask_chunk, ln.weight, ln.bias, self.linear_1.weight,
                              self.linear_1.bias, self.linear_2.weight, self.linear_2.bias, ln.eps,
                              residual=residual, update=update)

    if residual:
        if chunk_size is not None:
            raise ValueError("_transition: residual needs chunk_size None")
        return fn(x, mask, residual=True, update=update)
    if chunk_size is None:
        return fn(x, mask)
    n = x.shape[-3]
    return torch.cat([fn(x[..., s:s + chunk_size, :, :], mask[..., s:s + chunk_size, :, :])
                      for s in range(0, n, chunk_size)], dim=-3)


def msa_transition_forward(self: MSATransition, m, mask=None, chunk_size=None):
    """MSATransition.forward."""
    return _transition(self, self._fastfold_patch.ops_for(m), m, mask, chunk_size)


def pair_transition_forward(self: PairTransition, z, mask=None, chunk_size=None):
    """PairTransition.forward."""
    return _transition(self, self._fastfold_patch.ops_for(z), z, mask, chunk_size)


# the op's weight tuple (TriMulWeights' order) by parameter name in TriangleMultiplicativeUpdate
TRI_MUL_PARAMS = (
    "layer_norm_in.weight", "layer_norm_in.bias", "linear_a_p.weight", "linear_a_p.bias",
    "linear_a_g.weight", "linear_a_g.bias", "linear_b_p.weight", "linear_b_p.bias",
    "linear_b_g.weight", "linear_b_g.bias", "layer_norm_out.weight", "layer_norm_out.bias",
    "linear_z.weight", "linear_z.bias", "linear_g.weight", "linear_g.bias",
)
_tri_mul_params = operator.attrgetter(*TRI_MUL_PARAMS)  # one C call on the hot path


def tri_mul_weights(self: TriangleMultiplicativeUpdate) -> TriMulWeights:
    """The op's weight tuple, read from the OpenFold module at call time (never cached)."""
    return TriMulWeights(*_tri_mul_params(self))


def triangle_multiplication_forward(self: TriangleMultiplicativeUpdate, z, mask=None,
                                    inplace_safe=False, _add_with_inplace=False,
                                    _inplace_chunk_size=256):
    """TriangleMultiplicativeUpdate.forward (outgoing or incoming, from `self._outgoing`).

    Under OpenFold's in-place inference path with `_add_with_inplace`, z is overwritten with
    z + update and returned, as OpenFold's `_inference_forward` does.
    """
    x = _triangle_multiplication(self, self._fastfold_patch.ops_for(z), z, mask)
    if inplace_safe:
        if _add_with_inplace:
            z += x
            return z
        return x
    return x


def _triangle_multiplication(self: TriangleMultiplicativeUpdate, ops, z, mask,
                             carry: bool = False):
    """The triangle update of z; with `carry`, ``(update, z)``: z as the op hands it back, for
    the residual add, whose gradient the op's backward kernel then adds to dz."""
    if mask is None:
        mask = z.new_ones(z.shape[:-1])
    return ops.triangle_multiplication(z, mask, tri_mul_weights(self), self._outgoing,
                                       self.layer_norm_in.eps, carry=carry)


def outer_product_mean_forward(self: OuterProductMean, m, mask=None, chunk_size=None,
                               inplace_safe=False):
    """OuterProductMean.forward: fp32 with autocast off under fp16 autocast, as OpenFold."""
    return _outer_product_mean(self, self._fastfold_patch.ops_for(m), m, mask)


def _outer_product_mean(self: OuterProductMean, ops, m, mask, carry: bool = False):
    """The outer product mean's update of z; with `carry` (not under fp16, where OpenFold runs
    it on an fp32 copy of m), ``(update, m)``: m as the op hands it back, for the block's
    output, whose gradient the op's backward kernel then adds to dm."""
    if mask is None:
        mask = m.new_ones(m.shape[:-1])

    def fn(m, carry=False):
        ln = self.layer_norm
        return ops.outer_product_mean(
            m, mask, ln.weight, ln.bias, self.linear_1.weight, self.linear_1.bias,
            self.linear_2.weight, self.linear_2.bias, self.linear_out.weight, self.linear_out.bias,
            self.eps, ln.eps, carry=carry,
        )

    if is_fp16_enabled():
        if carry:
            raise ValueError("_outer_product_mean: no carry under fp16")
        with torch.autocast(device_type=m.device.type, enabled=False):
            return fn(m.float())
    return fn(m, carry)


# the sub-modules of an Evoformer block that its training step calls with ``carry``
# (``_carries``), by their names in the block
CARRIED_MODULES = ("msa_att_row", "msa_att_col", "core.msa_transition", "core.outer_product_mean",
                   "core.tri_mul_out", "core.tri_mul_in", "core.tri_att_start", "core.tri_att_end",
                   "core.pair_transition")


def _carries(mod: nn.Module, fn: Callable, chunk_size: Optional[int], inplace_safe: bool) -> bool:
    """Whether a block may call `mod`'s replacement `fn` as a function that also hands back its
    input as its LayerNorm saw it (``carry``), so that the residual add reading that input sends
    its gradient through the LayerNorm's backward kernel instead of an add of its own (the
    transitions go one step further: ``residual`` returns input + update, the add fused): training
    (gradients on, not in place), no chunks, and `mod` called as in stock OpenFold would call
    `fn` alone (its forward is `fn`, no module hooks, local or global)."""
    return (torch.is_grad_enabled() and chunk_size is None and not inplace_safe
            and getattr(mod.forward, "__func__", None) is fn and _no_hooks(mod))


def _dropout_residual(ops, drop: nn.Module, residual: torch.Tensor, update: torch.Tensor,
                      inplace_safe: bool) -> torch.Tensor:
    """residual + drop(update), drawing OpenFold's shared dropout mask when training."""
    if drop.training and drop.r > 0.0:
        return ops.dropout_add(residual, update, drop.r, True, drop.batch_dim)
    return add(residual, update, inplace_safe)


def evoformer_block_core_forward(self: EvoformerBlockCore, input_tensors, msa_mask, pair_mask,
                                 chunk_size=None, use_lma=False, inplace_safe=False,
                                 _mask_trans=True, _attn_chunk_size=None,
                                 _offload_inference=False, _m_update=None):
    """EvoformerBlockCore.forward: MSA transition, outer product mean, then the pair stack.
    `_m_update` (the blocks' own calls, ``_core``): an update of m still to be added, which
    the MSA transition's LayerNorm adds where the transition ``_carries``."""
    _reject_offload(_offload_inference)
    m, z = input_tensors
    ops = self._fastfold_patch.ops_for(m)
    msa_trans_mask = msa_mask if _mask_trans else None
    pair_trans_mask = pair_mask if _mask_trans else None
    if _attn_chunk_size is None:
        _attn_chunk_size = chunk_size
    drop = self.ps_dropout_row_layer

    if _carries(self.msa_transition, msa_transition_forward, chunk_size, inplace_safe):
        m = _transition(self.msa_transition, ops, m, msa_trans_mask, None, residual=True,
                        update=_m_update)
    else:
        if _m_update is not None:
            m = add(m, _m_update, inplace_safe)
        m = add(m, self.msa_transition(m, mask=msa_trans_mask, chunk_size=chunk_size),
                inplace_safe)
    if (_carries(self.outer_product_mean, outer_product_mean_forward, chunk_size, inplace_safe)
            and not is_fp16_enabled()):
        upd, m = _outer_product_mean(self.outer_product_mean, ops, m, msa_mask, carry=True)
    else:
        upd = self.outer_product_mean(m, mask=msa_mask, chunk_size=chunk_size,
                                      inplace_safe=inplace_safe)
    z = add(z, upd, inplace_safe)
    for tri_mul in (self.tri_mul_out, self.tri_mul_in):
        if inplace_safe:
            z = tri_mul(z, mask=pair_mask, inplace_safe=True, _add_with_inplace=True)
            continue
        if _carries(tri_mul, triangle_multiplication_forward, None, inplace_safe):
            upd, z = _triangle_multiplication(tri_mul, ops, z, pair_mask, carry=True)
        else:
            upd = tri_mul(z, mask=pair_mask)
        z = _dropout_residual(ops, drop, z, upd, False)
    if _carries(self.tri_att_start, triangle_attention_forward, _attn_chunk_size, inplace_safe):
        upd, z = _triangle_attention(self.tri_att_start, ops, z, pair_mask, None, carry=True)
    else:
        upd = self.tri_att_start(z, mask=pair_mask, chunk_size=_attn_chunk_size,
                                 use_lma=use_lma, inplace_safe=inplace_safe)
    z = _dropout_residual(ops, drop, z, upd, inplace_safe)
    z = z.transpose(-2, -3)
    if inplace_safe:
        z = z.contiguous()
    if _carries(self.tri_att_end, triangle_attention_forward, _attn_chunk_size, inplace_safe):
        upd, z = _triangle_attention(self.tri_att_end, ops, z, pair_mask.transpose(-1, -2), None,
                                     carry=True)
    else:
        upd = self.tri_att_end(z, mask=pair_mask.transpose(-1, -2), chunk_size=_attn_chunk_size,
                               use_lma=use_lma, inplace_safe=inplace_safe)
    z = _dropout_residual(ops, drop, z, upd, inplace_safe)
    z = z.transpose(-2, -3)
    if inplace_safe:
        z = z.contiguous()
    if _carries(self.pair_transition, pair_transition_forward, chunk_size, inplace_safe):
        return m, _transition(self.pair_transition, ops, z, pair_trans_mask, None, residual=True)
    upd = self.pair_transition(z, mask=pair_trans_mask, chunk_size=chunk_size)
    return m, add(z, upd, inplace_safe)


def _core(self, m, update, z, msa_mask, pair_mask, chunk_size, use_lma, inplace_safe,
          _mask_trans, _attn_chunk_size):
    """self.core([m + update, z], ...): with the core as stock calls our forward (``_carries``),
    the add is left to its MSA transition's LayerNorm (``_m_update``)."""
    kw = dict(msa_mask=msa_mask, pair_mask=pair_mask, chunk_size=chunk_size, use_lma=use_lma,
              inplace_safe=inplace_safe, _mask_trans=_mask_trans,
              _attn_chunk_size=_attn_chunk_size)
    if _carries(self.core, evoformer_block_core_forward, chunk_size, inplace_safe):
        return evoformer_block_core_forward(self.core, [m, z], **kw, _m_update=update)
    return self.core([add(m, update, inplace_safe), z], **kw)


def _row_attention_residual(self, ops, m, z, msa_mask, chunk_size, use_lma, inplace_safe):
    """(m + dropout(MSA row attention update), z): the first step of an Evoformer or extra-MSA
    block, with m and z carried through the attention's LayerNorms when ``_carries``."""
    if _carries(self.msa_att_row, msa_attention_forward, chunk_size, inplace_safe):
        upd, m, z = _msa_attention(self.msa_att_row, ops, m, z, msa_mask, None, carry=True)
    else:
        upd = self.msa_att_row(m, z=z, mask=msa_mask, chunk_size=chunk_size, use_lma=use_lma)
    return _dropout_residual(ops, self.msa_dropout_layer, m, upd, inplace_safe), z


def evoformer_block_forward(self: EvoformerBlock, m, z, msa_mask, pair_mask, chunk_size=None,
                            use_lma=False, use_flash=False, inplace_safe=False, _mask_trans=True,
                            _attn_chunk_size=None, _offload_inference=False,
                            _offloadable_inputs=None):
    """EvoformerBlock.forward: MSA row attention (dropout), column attention, then the core."""
    _reject_offload(_offload_inference)
    ops = self._fastfold_patch.ops_for(m)
    if _attn_chunk_size is None:
        _attn_chunk_size = chunk_size
    m, z = _row_attention_residual(self, ops, m, z, msa_mask, _attn_chunk_size, use_lma,
                                   inplace_safe)
    if _carries(self.msa_att_col, msa_column_attention_forward, chunk_size, inplace_safe):
        upd, m = _msa_column_attention(self.msa_att_col, ops, m, msa_mask, None, carry=True)
    else:
        upd = self.msa_att_col(m, mask=msa_mask, chunk_size=chunk_size, use_lma=use_lma,
                               use_flash=use_flash)
    return _core(self, m, upd, z, msa_mask, pair_mask, chunk_size, use_lma, inplace_safe,
                 _mask_trans, _attn_chunk_size)


def extra_msa_block_forward(self: ExtraMSABlock, m, z, msa_mask, pair_mask, chunk_size=None,
                            use_lma=False, inplace_safe=False, _mask_trans=True,
                            _attn_chunk_size=None, _offload_inference=False,
                            _offloadable_inputs=None):
    """ExtraMSABlock.forward, with OpenFold's activation checkpoint around column attention and
    the core when `self.ckpt` is set and gradients are on."""
    _reject_offload(_offload_inference)
    ops = self._fastfold_patch.ops_for(m)
    if _attn_chunk_size is None:
        _attn_chunk_size = chunk_size
    m, z = _row_attention_residual(self, ops, m, z, msa_mask, _attn_chunk_size, use_lma,
                                   inplace_safe)

    def fn(m, z):
        upd = self.msa_att_col(m, mask=msa_mask, chunk_size=chunk_size, use_lma=use_lma)
        return _core(self, m, upd, z, msa_mask, pair_mask, chunk_size, use_lma, inplace_safe,
                     _mask_trans, _attn_chunk_size)

    if torch.is_grad_enabled() and self.ckpt:
        from openfold.utils.checkpointing import get_checkpoint_fn
        return get_checkpoint_fn()(fn, m, z)
    return fn(m, z)


def template_pair_stack_block_forward(self: TemplatePairStackBlock, z, mask, chunk_size=None,
                                      use_lma=False, inplace_safe=False, _mask_trans=True,
                                      _attn_chunk_size=None):
    """TemplatePairStackBlock.forward: each template's pair stack, in OpenFold's order
    (triangle attention first, then the triangle updates and the transition)."""
    ops = self._fastfold_patch.ops_for(z)
    if _attn_chunk_size is None:
        _attn_chunk_size = chunk_size
    outs = []
    for i in range(z.shape[-4]):
        single = z[..., i:i + 1, :, :, :]
        single_mask = mask[..., i:i + 1, :, :]
        single = _dropout_residual(ops, self.dropout_row, single, self.tri_att_start(
            single, chunk_size=_attn_chunk_size, mask=single_mask, use_lma=use_lma,
            inplace_safe=inplace_safe), inplace_safe)
        single = _dropout_residual(ops, self.dropout_col, single, self.tri_att_end(
            single, chunk_size=_attn_chunk_size, mask=single_mask, use_lma=use_lma,
            inplace_safe=inplace_safe), inplace_safe)
        for tri_mul in (self.tri_mul_out, self.tri_mul_in):
            if inplace_safe:
                single = tri_mul(single, mask=single_mask, inplace_safe=True,
                                 _add_with_inplace=True)
            else:
                single = _dropout_residual(ops, self.dropout_row, single,
                                           tri_mul(single, mask=single_mask), False)
        single = add(single, self.pair_transition(
            single, mask=single_mask if _mask_trans else None, chunk_size=chunk_size),
            inplace_safe)
        outs.append(single)
    if inplace_safe:
        for i, single in enumerate(outs):
            if single.data_ptr() != z[..., i:i + 1, :, :, :].data_ptr():
                z[..., i:i + 1, :, :, :] = single
        return z
    return torch.cat(outs, dim=-4)


# OpenFold class -> replacement forward. Subclasses (MSARowAttentionWithPairBias,
# TriangleMultiplicationOutgoing/Incoming, TriangleAttentionEndingNode) resolve through the MRO.
FORWARDS: Dict[type, Callable] = {
    Attention: attention_forward,
    MSAAttention: msa_attention_forward,
    MSAColumnAttention: msa_column_attention_forward,
    MSAColumnGlobalAttention: msa_column_global_attention_forward,
    TriangleAttention: triangle_attention_forward,
    TemplatePointwiseAttention: template_pointwise_attention_forward,
    MSATransition: msa_transition_forward,
    PairTransition: pair_transition_forward,
    TriangleMultiplicativeUpdate: triangle_multiplication_forward,
    OuterProductMean: outer_product_mean_forward,
    EvoformerBlockCore: evoformer_block_core_forward,
    EvoformerBlock: evoformer_block_forward,
    ExtraMSABlock: extra_msa_block_forward,
    TemplatePairStackBlock: template_pair_stack_block_forward,
}


def replacement_for(module: nn.Module, table: Optional[Dict[type, Callable]] = None):
    """The replacement forward for `module`'s class (through its MRO), or None."""
    table = FORWARDS if table is None else table
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None
