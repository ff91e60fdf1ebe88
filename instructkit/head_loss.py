"""The output head's cross-entropy in chunks of rows, for vocabularies of 150,000 tokens.

With Qwen3's 151,936-token vocabulary the logits of a batch of 8 x 1,024 tokens take 5 GB in
float32, and autograd keeps them (and the softmax's output) for the backward pass. Here at
most one chunk's logits exist at a time:

- While training with a plain bias-free nn.Linear head (the families' own, tied or not), the
  forward pass computes each chunk's gradients at once and keeps only those
  (`FusedHeadLoss`): the gradient of a summed cross-entropy with respect to the logits is
  softmax(logits) - one_hot(target), so each chunk's logits become their own gradient in
  place. The backward pass then only scales them by the incoming gradient. This costs the
  three products of an unchunked head (logits, their gradient to the hidden states and to
  the weight) and no recomputation.
- Any other head (a LoRA-wrapped one) runs through torch.utils.checkpoint chunk by chunk:
  the backward pass recomputes each chunk's logits.
- Without gradients (evaluation), the chunks run one after the other.

Tests (tests/test_other_llms.py): the loss and every gradient equal the chapter's
calc_loss_batch, in one chunk and in several, with LoRA layers too; tests/test_head_loss.py
checks FusedHeadLoss against F.cross_entropy for tied, frozen and autocast heads.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows of hidden states that go through the output head at once: 512 x 151,936 float32
# logits are 311 MB (Qwen3), 512 x 49,152 are 101 MB (SmolLM2).
LOSS_CHUNK_ROWS = 512


def _head_loss_sum(out_head, hidden, targets):
    """Sum of the cross-entropy losses of `hidden` (rows, emb_dim) against `targets` (rows,)."""
    return F.cross_entropy(out_head(hidden).float(), targets, reduction="sum")


class FusedHeadLoss(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight^T, targets)), gradients computed in the forward pass.

    hidden: (rows, emb_dim); weight: (vocab_size, emb_dim); targets: (rows,), every one
    counted. Under autocast the products run in autocast's dtype, as nn.Linear's would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            h, w = hidden.detach().to(dtype), weight.detach().to(dtype)
            grad_hidden = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                t = targets[rows]
                logits = (h[rows] @ w.T).float()  # (chunk, vocab_size)
                lse = torch.logsumexp(logits, dim=-1)  # (chunk,)
                total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
                # d(loss)/d(logits) = softmax - one_hot(target), made in the logits' memory
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ w  # (chunk, emb_dim)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, h[rows])  # (vocab_size, emb_dim)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # the saved gradients are scaled in place: this backward runs once
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def head_loss_sum(out_head, hidden, targets, chunk_rows=LOSS_CHUNK_ROWS):
    """Sum of the cross-entropy losses of out_head(hidden) against targets, `chunk_rows` rows
    of logits at a time (see the module's notes for the three ways)."""
    training = torch.is_grad_enabled() and (hidden.requires_grad or any(
        p.requires_grad for p in out_head.parameters()))
    if training and type(out_head) is nn.Linear and out_head.bias is None:
        return FusedHeadLoss.apply(hidden, out_head.weight, targets, chunk_rows)
    if hidden.shape[0] <= chunk_rows:
        return _head_loss_sum(out_head, hidden, targets)
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if training:
            total = total + checkpoint(_head_loss_sum, out_head, hidden[rows], targets[rows],
                                       use_reentrant=False)
        else:
            total = total + _head_loss_sum(out_head, hidden[rows], targets[rows])
    return total
