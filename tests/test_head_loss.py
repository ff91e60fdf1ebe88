"""instructkit/head_loss.py: the chunked output-head loss equals F.cross_entropy on full logits.

The loss and the gradients to the hidden states and to the head's weight, for one chunk and
several, for a head tied to an embedding, a frozen head, and under bf16 autocast; and that
the fused path keeps no logits for the backward pass.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from instructkit.head_loss import FusedHeadLoss, head_loss_sum

ROWS, EMB, VOCAB = 37, 16, 101


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(EMB, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, EMB, generator=gen))
    hidden = torch.randn(ROWS, EMB, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    return head, hidden, targets


def reference(head, hidden, targets, scale):
    """(loss, grad of hidden, grad of weight) through full logits and F.cross_entropy."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = head.weight.detach().clone().requires_grad_(head.weight.requires_grad)
    loss = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [512, 10, 1], ids=["one-chunk", "chunks", "row-by-row"])
def test_fused_loss_and_gradients_equal_full_logits(chunk_rows):
    head, hidden, targets = inputs()
    expected_loss, expected_hidden, expected_weight = reference(head, hidden, targets, 0.25)
    loss = head_loss_sum(head, hidden, targets, chunk_rows)
    assert loss.grad_fn is not None and type(loss.grad_fn).__name__.startswith("FusedHeadLoss")
    (loss * 0.25).backward()  # the incoming gradient is not 1: the backward scales by it
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, expected_weight, rtol=1e-5, atol=1e-6)


def test_a_tied_head_sums_both_gradients():
    """The head's weight is also the embedding's: its gradient is the two parts added."""
    head, _, targets = inputs(1)
    emb = nn.Embedding(VOCAB, EMB)
    emb.weight = head.weight
    ids = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(1))
    hidden = torch.tanh(emb(ids))
    head_loss_sum(head, hidden, targets, 8).backward()
    fused = head.weight.grad.clone()
    head.weight.grad = None
    F.cross_entropy(head(torch.tanh(emb(ids))), targets, reduction="sum").backward()
    torch.testing.assert_close(fused, head.weight.grad, rtol=1e-5, atol=1e-6)


def test_a_frozen_head_gets_no_gradient():
    head, hidden, targets = inputs(2)
    head.requires_grad_(False)
    _, expected_hidden, _ = reference(head, hidden, targets, 1.0)
    head_loss_sum(head, hidden, targets, 8).backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_the_products_run_in_bf16():
    head, hidden, targets = inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss_sum(head, hidden, targets, 8)
        expected = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    _, expected_hidden, _ = reference(head, hidden, targets, 1.0)
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=0.05, atol=0.05)


def test_without_gradients_and_for_other_heads_the_plain_chunks_run():
    head, hidden, targets = inputs(4)
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    with torch.no_grad():
        torch.testing.assert_close(head_loss_sum(head, hidden, targets, 8), expected)
    biased = nn.Linear(EMB, VOCAB)  # not the families' head: checkpointed chunks
    loss = head_loss_sum(biased, hidden, targets, 8)
    assert not type(loss.grad_fn).__name__.startswith("FusedHeadLoss")
    torch.testing.assert_close(loss, F.cross_entropy(biased(hidden), targets, reduction="sum"))


def test_the_fused_loss_keeps_no_logits_for_the_backward_pass():
    """What autograd holds after the forward pass: the two gradients, nothing of vocab x rows
    beyond the weight's own shape."""
    head, hidden, targets = inputs(5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        FusedHeadLoss.apply(hidden, head.weight, targets, 512)
    assert sorted(saved) == sorted([hidden.shape, head.weight.shape])
