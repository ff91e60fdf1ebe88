"""Faster DPO, with the same numbers as dpo.py's plain code.

Not in the book. The plain `compute_dpo_loss_batch` makes four full model calls per batch
and computes the output head (emb_dim x 50,257, the largest matrix multiply of GPT-2) and a
log-softmax over the whole vocabulary at every position, padding and prompt included, only
to keep the response tokens. Here:

- `packed_logprobs`: each row is cut after its last response token and the rows are packed
  into one sequence, so the padding costs nothing in the linear layers; the output head and
  the log-softmax run only where a response token is predicted. Chosen and rejected go
  through the model in one call.
- `reference_logprobs`: the frozen reference model runs under `torch.inference_mode`
  (no autograd bookkeeping at all), or not at all when the batch carries log-probabilities
  cached for the whole dataset by `cache_reference_logprobs` (two numbers per entry: the
  reference never changes, so each entry needs it once, not at every step and evaluation).

`compute_dpo_loss_batch_fast` has the signature of `dpo.compute_dpo_loss_batch`; pass it
as `loss_fn` to `dpo.train_model_dpo_simple`. The functions work on any model with the
book's module layout (tok_emb, pos_emb, drop_emb, trf_blocks[i].{norm1, att, ff, norm2,
drop_shortcut}, final_norm, out_head), reading its modules; they never subclass it.
"""

from functools import partial

import torch
import torch.nn.functional as F

from dpo import compute_dpo_loss, preference_collate_fn


class PackedRows:
    """The rows of a batch cut to different lengths and packed into one sequence.

    `keep` (batch, n_tokens) bool is True on a prefix of every row. Layers that work
    position by position run on the (1, kept) packed sequence; attention unpacks to
    (batch, n_tokens) with zeros where rows were cut, and stays causal, so every kept
    position sees exactly the tokens it sees in the full batch.
    """

    def __init__(self, keep):
        self.batch_size, self.n_tokens = keep.shape
        self.index = keep.flatten().nonzero().squeeze(1)  # kept positions, row after row
        self.positions = self.index % self.n_tokens  # each kept token's position in its row

    def pack(self, x):
        """(batch, n_tokens, ...) -> (1, kept, ...)."""
        return x.flatten(0, 1).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x):
        """(1, kept, dim) -> (batch, n_tokens, dim), zeros at the cut-off positions."""
        full = x.new_zeros(self.batch_size * self.n_tokens, x.shape[-1])
        return full.index_copy(0, self.index, x[0]).view(self.batch_size, self.n_tokens, -1)


def _packed_attention(att, x, packed):
    """The book's MultiHeadAttention `att` on packed rows x (1, kept, d_in) -> (1, kept, d_out)."""
    queries, keys, values = (packed.unpack(w(x)) for w in (att.W_query, att.W_key, att.W_value))
    b, n_tokens, d_out = queries.shape

    def heads(t):  # (b, n_tokens, d_out) -> (b, num_heads, n_tokens, head_dim)
        return t.view(b, n_tokens, att.num_heads, att.head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        heads(queries), heads(keys), heads(values), is_causal=True,
        dropout_p=att.dropout.p if att.training else 0.0)
    context = context.transpose(1, 2).reshape(b, n_tokens, d_out)
    return att.out_proj(packed.pack(context))


def packed_hidden_states(model, input_ids, keep):
    """The final-norm outputs at the kept positions: (kept, emb_dim), row after row."""
    packed = PackedRows(keep)
    x = model.drop_emb(model.tok_emb(packed.pack(input_ids)) + model.pos_emb(packed.positions))
    for block in model.trf_blocks:  # the book's TransformerBlock.forward, on packed rows
        shortcut = x
        x = block.drop_shortcut(_packed_attention(block.att, block.norm1(x), packed)) + shortcut
        shortcut = x
        x = block.drop_shortcut(block.ff(block.norm2(x))) + shortcut
    return model.final_norm(x)[0]


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

    hidden = packed_hidden_states(model, input_ids[:, :longest], keep)  # (kept, emb_dim)
    logits = model.out_head(hidden[predicts[keep]]).float()  # (n_predicting, vocab_size)
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


def compute_dpo_loss_batch_fast(batch, policy_model, reference_model, beta):
    """Same as dpo.compute_dpo_loss_batch (within float tolerance), with less work."""
    policy_chosen, policy_rejected = dpo_logprobs(policy_model, batch)
    ref_chosen, ref_rejected = reference_logprobs(reference_model, batch)
    return compute_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)


def cache_reference_logprobs(reference_model, dataset, batch_size=8, **collate_kwargs):
    """The dataset's items with the reference log-probabilities added, computed once.

    Returns a list of items (dicts) carrying "reference_chosen_logprob" and
    "reference_rejected_logprob"; collate them with `collate_with_reference` and the same
    `collate_kwargs` (allowed_max_length, ...) so the cached numbers match the batches.
    """
    from torch.utils.data import DataLoader

    collate = partial(preference_collate_fn, **collate_kwargs)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    cached = []
    for batch in loader:
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
