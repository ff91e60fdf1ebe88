"""Faster DPO, with the same numbers as dpo.py's plain code.

Not in the book. The plain `compute_dpo_loss_batch` makes four full model calls per batch
and computes the output head (emb_dim x 50,257, the largest matrix multiply of GPT-2) and a
log-softmax over the whole vocabulary at every position, padding and prompt included, only
to keep the response tokens. Here:

- `packed_logprobs`: each row is cut after its last response token and the rows are packed
  into one sequence (fast_gpt's PackedRows and fused forward pass), so the padding costs
  nothing in the linear layers; the output head and the log-softmax run only where a
  response token is predicted. Chosen and rejected go through the model in one call.
- `reference_logprobs`: the frozen reference model runs under `torch.inference_mode`
  (no autograd bookkeeping at all), or not at all when the batch carries log-probabilities
  cached for the whole dataset by `cache_reference_logprobs` (two numbers per entry: the
  reference never changes, so each entry needs it once, not at every step and evaluation).

`compute_dpo_loss_batch_fast` has the signature of `dpo.compute_dpo_loss_batch`; pass it
as `loss_fn` to `dpo.train_model_dpo_simple`. Like fast_gpt, it works on any model with the
book's module layout, reading its modules; it never subclasses it. A Qwen3 or Llama model
(qwen3.py, llama3.py) goes through fast_llm's forward pass instead (`fast_llm.fast_path`):
its 150k-token output head, too, runs only where a response token is predicted.
"""

from functools import partial

import torch
import torch.nn.functional as F

from fast_gpt import PackedRows, autocast
from instructkit.dpo import compute_dpo_loss, preference_collate_fn
from instructkit.fast_llm import fast_path


def packed_logprobs(model, input_ids, selection_mask):
    """Equals `dpo.compute_logprobs(model(input_ids), input_ids, selection_mask)`: (batch,).

    Position p predicts token p + 1, so the positions that count are those just before a
    selected token. Nothing after a row's last such position can influence it (attention is
    causal), so the row is cut there.
    """
    predicts = torch.zeros_like(selection_mask)
    predicts[:, :-1] = selection_mask[:, 1:]  # (batch, n_tokens): position predicts a selected token
    n_tokens = predicts.shape[1]
    ends = torch.where(predicts, torch.arange(1, n_tokens + 1, device=predicts.device), 0).amax(1)
    longest = max(int(ends.max()), 1)
    predicts, input_ids = predicts[:, :longest], input_ids[:, :longest + 1]
    keep = torch.arange(longest, device=predicts.device) < ends[:, None]  # (batch, longest)

    # fast_gpt's forward pass on the packed rows: (1, kept, emb_dim)
    packed = PackedRows(keep)
    # fast_gpt's for the book's GPT, fast_llm's (RoPE, grouped-query) for Qwen3 and Llama
    transform = fast_path(model).transform
    hidden = transform(model, packed.pack(input_ids[:, :longest]), packed.positions, packed)
    logits = model.out_head(hidden[0][predicts[keep]]).float()  # (n_predicting, vocab_size)
    labels = input_ids[:, 1:][predicts]  # the selected tokens, in the same (row-major) order
    token_logprobs = torch.gather(F.log_softmax(logits, dim=-1), -1, labels[:, None]).squeeze(1)

    rows = torch.arange(predicts.shape[0], device=predicts.device)[:, None].expand_as(predicts)
    sums = token_logprobs.new_zeros(predicts.shape[0]).index_add(0, rows[predicts], token_logprobs)
    return sums / predicts.sum(1)


def dpo_logprobs(model, batch):
    """(chosen, rejected) log-probabilities of a collated batch, both (batch,), in one call."""
    ids = torch.cat([batch["chosen"], batch["rejected"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    logprobs = packed_logprobs(model, ids, mask)
    n = batch["chosen"].shape[0]
    return logprobs[:n], logprobs[n:]


def reference_logprobs(reference_model, batch):
    """The reference model's (chosen, rejected) log-probabilities: cached, or computed with
    no autograd at all (torch.inference_mode)."""
    if "reference_chosen_logprobs" in batch:
        return batch["reference_chosen_logprobs"], batch["reference_rejected_logprobs"]
    with torch.inference_mode():
        chosen, rejected = dpo_logprobs(reference_model, batch)
    return chosen.clone(), rejected.clone()  # normal tensors again, usable next to autograd


def _precision_context(precision, device):
    """`precision.autocast()`, or without a Precision fast_gpt's autocast for `device` (bfloat16
    on a CUDA GPU with bfloat16 hardware, else float32)."""
    return autocast(device) if precision is None else precision.autocast()


def compute_dpo_loss_batch_fast(batch, policy_model, reference_model, beta, precision=None):
    """Same as dpo.compute_dpo_loss_batch (within float tolerance), with less work.

    The policy and the reference (when not cached) run under the same autocast: `precision`'s
    (a precision.Precision), or by default bfloat16 on a CUDA GPU with bfloat16 hardware.
    Weights stay float32; the log-softmax is computed in float32.
    """
    with _precision_context(precision, batch["chosen"].device):
        policy_chosen, policy_rejected = dpo_logprobs(policy_model, batch)
        ref_chosen, ref_rejected = reference_logprobs(reference_model, batch)
    return compute_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)


def cache_reference_logprobs(reference_model, dataset, batch_size=8, precision=None,
                             **collate_kwargs):
    """The dataset's items with the reference log-probabilities added, computed once.

    Returns a list of items (dicts) carrying "reference_chosen_logprob" and
    "reference_rejected_logprob"; collate them with `collate_with_reference` and the same
    `collate_kwargs` (allowed_max_length, ...) so the cached numbers match the batches.
    `precision`: the one the policy trains in (pass the same to compute_dpo_loss_batch_fast),
    so that a policy still equal to its reference gets, on the batches cached here, a loss of
    ln 2 and rewards of exactly 0; by default the same autocast as compute_dpo_loss_batch_fast's
    default.
    """
    from torch.utils.data import DataLoader

    collate = partial(preference_collate_fn, **collate_kwargs)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    cached = []
    for batch in loader:
        with _precision_context(precision, batch["chosen"].device):
            chosen, rejected = reference_logprobs(reference_model, batch)
        for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True):
            cached.append({**dataset[len(cached)], "reference_chosen_logprob": c,
                           "reference_rejected_logprob": r})
    return cached


def collate_with_reference(batch, **collate_kwargs):
    """`preference_collate_fn` plus the cached reference log-probabilities as (batch,) tensors."""
    batch_data = preference_collate_fn(batch, **collate_kwargs)
    device = batch_data["chosen"].device
    for key in ("chosen", "rejected"):
        batch_data[f"reference_{key}_logprobs"] = torch.tensor(
            [item[f"reference_{key}_logprob"] for item in batch], device=device)
    return batch_data
