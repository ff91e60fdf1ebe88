"""Speed-ups for the from-scratch Qwen3 and Llama 3 models (qwen3.py, llama3.py).

Not in the book. fast_gpt.py's twin for the RoPE/grouped-query families, organised the same
way: its own forward pass over the model's submodules (`tok_emb`, `trf_blocks[i].{norm1,
att, ff, norm2}`, `final_norm`, `out_head`, the `cos`/`sin` tables), so the model is never
subclassed or patched, state dicts are unchanged, and LoRA-wrapped linear layers work. Its
arithmetic is the model's to the bit, in fewer calls, which is what a batch-1 decode step
pays for (each call costs about as much as a small kernel): the RMSNorms as one F.rms_norm
each (`rms_norm`), RoPE with its tables prepared once per forward pass (`RopeTables`). It
adds:
- a key/value cache for generation (`generate`, `generate_stream`): the cache holds the keys
  after RoPE, one slot per position, for the num_kv_groups heads only (the grouped heads are
  what makes it small); each step runs the newest token at position = cache length;
- batched generation of left-padded prompts (`generate_batch`, `generate_answer_ids`): each
  row's positions count from its first real token and the padding is masked out of
  attention, so each answer is that prompt's answer alone;
- the chapter's loss without waste (`loss_sum_and_count`, `calc_loss_batch_packed`,
  `calc_loss_loader_fast`): rows cut after their last counted target and packed (no compute
  for padding), and the output head run only on hidden states whose target counts (not
  -100), in chunks of rows (instructkit/head_loss.py). With a 151,936-token vocabulary the
  logits of a batch of 8 x 1,024 tokens are 5 GB in float32; there at most one chunk's
  logits exist at a time, and the backward pass recomputes none of them.
- the chapter's training loop on that loss (`train_model_fast`: train_model_simple's
  arguments, printed lines and returned losses; ch07-with-other-llms.ipynb swaps it in as
  the chapter swaps in fast_gpt's).
- decode steps whose matrix-vector products go through instructkit/parallel_matvec.py, as
  fast_gpt's do: each weight's rows split over the CPU's cores where the first steps measure
  that faster (the `linear` argument of the functions below; the same tokens either way).
Attention is F.scaled_dot_product_attention. `fast_path(model)` gives this module or
fast_gpt for a model (the same function names and arguments in both), `context_size(model)`
the longest input either kind takes. fast_gpt.py's family-independent pieces are
imported, not copied: sampling (`sample_next_token`), packing (`PackedRows`), positions and
masks for padding (`positions_and_mask`), autocast.

Why a module of its own and not more of fast_gpt.py: fast_gpt's forward is GPT-2's
(position embedding, LayerNorm, GELU, full-width heads, the parallel decode products) and a
root file beside the book; the families here differ in every layer but the loop, and the
package is where the project's code beyond the book lives.

Tests (tests/test_other_llms.py): against transformers on tiny random Qwen3 and Llama
models, the same logits and the same greedy tokens for batch 1 (KV-cached), batched and
left-padded; against the book's previous_chapters.generate on the plain model, the same
sampled tokens for a seed and the same tokens past the context length; the packed, chunked
loss and its gradients equal to the chapter's calc_loss_batch, with LoRA layers too.
tests/test_other_llms_notebook.py: train_model_fast's losses equal train_model_simple's.
"""

import itertools
import sys

import torch
import torch.nn.functional as F

from fast_gpt import (
    KVCache,
    PackedRows,
    autocast,
    call_module,
    last_position_logits,
    linear_each,
    positions_and_mask,
    sample_next_token,
    training_loop,
)
from instructkit.head_loss import LOSS_CHUNK_ROWS, head_loss_sum
from instructkit.parallel_matvec import MatvecChooser

# F.scaled_dot_product_attention shares key/value heads itself from torch 2.5 (enable_gqa)
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


# F.rms_norm: torch 2.4 and later (Intel Macs stop at torch 2.2)
_FUSED_RMS_NORM = hasattr(F, "rms_norm")


def rms_norm(norm, x):
    """llama3.RMSNorm `norm` on x, as one call where that is the same arithmetic.

    In float32 (outside autocast) the module's steps (mean of squares, rsqrt, scale) are
    exactly F.rms_norm's, to the bit; a decode step runs 65 of them (SmolLM2-360M), and one
    fused call costs a third of the module's eight. Otherwise the module itself.
    """
    if (_FUSED_RMS_NORM and x.dtype == torch.float32 and norm.scale.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)):
        return F.rms_norm(x, (x.shape[-1],), norm.scale, norm.eps)
    return norm(x)


class RopeTables:
    """The RoPE rows of one forward pass's positions, prepared once for all its layers.

    cos, sin: (n_tokens, head_dim), or (batch, n_tokens, head_dim) for per-row positions.
    `rotate(x)` is llama3.apply_rope(x, cos, sin) to the bit: x * cos + rotate_half(x) * sin,
    where rotate_half(x) = (-x2, x1) for x's halves (x1, x2). The sign is moved onto the
    table: (x2, x1) * (-sin1, sin2) has the same products, and negation is exact. So each
    call is four kernels instead of apply_rope's ten, twice a layer.
    """

    def __init__(self, cos, sin):
        self.half = cos.shape[-1] // 2
        # a heads axis: (1 or batch, 1, n_tokens, head_dim)
        self.cos = cos.unsqueeze(-3)
        self.sin = torch.cat((-sin[..., :self.half], sin[..., self.half:]), dim=-1).unsqueeze(-3)

    def rotate(self, x):
        """x (batch, heads, n_tokens, head_dim), turned by the angles of its positions."""
        if self.cos.dtype != x.dtype:  # apply_rope's cast to x's dtype, kept for the next call
            self.cos, self.sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        half = self.half
        return x * self.cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * self.sin


def project(att, x, rope, linear=call_module):
    """GroupedQueryAttention.project (llama3.py) with the calls above: the queries (b,
    num_heads, n_tokens, head_dim) and the keys and values (b, num_kv_groups, n_tokens,
    head_dim), the queries and keys normalised (Qwen3's qk_norm) and turned by RoPE."""
    b, num_tokens, _ = x.shape
    queries, keys, values = linear_each(linear, (att.W_query, att.W_key, att.W_value), x)
    queries = queries.view(b, num_tokens, att.num_heads, att.head_dim).transpose(1, 2)
    keys = keys.view(b, num_tokens, att.num_kv_groups, att.head_dim).transpose(1, 2)
    values = values.view(b, num_tokens, att.num_kv_groups, att.head_dim).transpose(1, 2)
    if att.q_norm is not None:
        queries, keys = rms_norm(att.q_norm, queries), rms_norm(att.k_norm, keys)
    return rope.rotate(queries), rope.rotate(keys), values


def _unpack_heads(packed, x):
    """(1, heads, kept, head_dim) -> (batch, heads, n_tokens, head_dim), zeros where cut."""
    _, heads, _, head_dim = x.shape
    full = packed.unpack(x.transpose(1, 2).flatten(2))  # (batch, n_tokens, heads * head_dim)
    return full.view(packed.batch_size, packed.n_tokens, heads, head_dim).transpose(1, 2)


def attention(att, x, rope, attn_mask=None, kv_cache=None, layer_idx=0, linear=call_module):
    """GroupedQueryAttention.forward through F.scaled_dot_product_attention.

    x: (batch, n_tokens, d_in), or (1, kept, d_in) when attn_mask is a PackedRows.
    rope: the RopeTables of x's positions. attn_mask: None (causal), a bool tensor
    (batch or 1, 1, n_tokens, n_keys) True where a query may attend, or a PackedRows.
    kv_cache: a KVCache these keys and values are appended to, attending over all of it.
    linear: how the linear layers are called, `linear(module, x)`: the module itself, or a
    decode step's parallel_matvec.DecodeLinear (fast_gpt's, split over the cores).
    """
    # (b, heads or kv heads, n_tokens, head_dim)
    queries, keys, values = project(att, x, rope, linear)
    packed = attn_mask if isinstance(attn_mask, PackedRows) else None
    if packed is not None:  # back to (batch, ..., n_tokens, ...) rows for causal attention
        queries, keys, values = (_unpack_heads(packed, t) for t in (queries, keys, values))
        attn_mask = None
    b, _, num_tokens, _ = queries.shape

    start = 0  # positions already cached
    if kv_cache is not None:
        start = kv_cache.length
        keys, values = kv_cache.append(layer_idx, keys, values)

    options = {"enable_gqa": True} if _SDPA_GQA else {}
    if not _SDPA_GQA:  # older torch: repeat each key/value head for its query heads
        keys = keys.repeat_interleave(att.group_size, dim=1)
        values = values.repeat_interleave(att.group_size, dim=1)
    context = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=attn_mask, scale=att.scaling,
        is_causal=attn_mask is None and start == 0, **options,
    )  # (b, num_heads, num_tokens, head_dim)
    context = context.transpose(1, 2).reshape(b, num_tokens, att.d_out)
    if packed is not None:
        context = packed.pack(context)
    return linear(att.out_proj, context)


def feed_forward(ff, x, linear=call_module):
    """FeedForward.forward (SwiGLU) with its linear layers called through `linear`."""
    gate, values = linear_each(linear, (ff.fc1, ff.fc2), x)
    return linear(ff.fc3, F.silu(gate) * values)


def transform(model, in_idx, positions, attn_mask=None, kv_cache=None, linear=call_module):
    """Embedding, the transformer blocks and the final norm: (batch, n_tokens, emb_dim).

    positions: (n_tokens,) or (batch, n_tokens) position ids, which pick the RoPE rows.
    linear: see attention.
    """
    x = model.tok_emb(in_idx)
    rope = RopeTables(model.cos[positions], model.sin[positions])
    for layer_idx, block in enumerate(model.trf_blocks):
        x = x + attention(block.att, rms_norm(block.norm1, x), rope, attn_mask, kv_cache, layer_idx, linear)
        x = x + feed_forward(block.ff, rms_norm(block.norm2, x), linear)
    if kv_cache is not None:
        kv_cache.length += in_idx.shape[1]
    return rms_norm(model.final_norm, x)


def hidden_states(model, in_idx, kv_cache=None, pad_mask=None, linear=call_module):
    """Everything but the output head, continuing `kv_cache` when given.

    pad_mask: (batch, cached + n_tokens) bool, False at left-padding positions.
    linear: see attention.
    """
    start = kv_cache.length if kv_cache is not None else 0
    positions, attn_mask = positions_and_mask(start, in_idx.shape[1], pad_mask, in_idx.device)
    return transform(model, in_idx, positions, attn_mask, kv_cache, linear)


def context_size(model):
    """The longest input `model` takes: its RoPE table's rows (a GPT: its position embedding's)."""
    if hasattr(model, "pos_emb"):
        return model.pos_emb.weight.shape[0]
    return model.cos.shape[0]


def fast_path(model):
    """The module with the fast functions for `model`: this one for the RoPE/grouped-query
    families (qwen3.py, llama3.py), fast_gpt for the book's GPT. Both have `generate`,
    `generate_stream`, `generate_batch`, `generate_answer_ids`, `loss_sum_and_count`,
    `calc_loss_batch_packed`, `calc_loss_loader_fast`, `evaluate_model_fast` and
    `train_model_fast` with the same arguments, so a caller picks the module once:
    `fast_path(model).generate_stream(...)`."""
    import fast_gpt

    if hasattr(model.trf_blocks[0].att, "num_kv_groups"):
        return sys.modules[__name__]
    return fast_gpt


def _check_decode_dtype(decode_dtype):
    if decode_dtype is not None:
        from instructkit.errors import BadInputError

        raise BadInputError("--decode-dtype is for GPT-2 models only: Qwen3 and Llama models "
                            "decode with their own weights' dtype (load them in bfloat16 instead)")


#####################################
# Generation
#####################################

@torch.inference_mode()
def generation_steps(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None,
                     eos_id=None, pad_mask=None):
    """Yield the next tokens (batch, 1), step after step, as previous_chapters.generate picks them.

    The prompt runs once (prefill), then only the newest token (KV cache). Past the context
    length the window is cropped and recomputed, as the book's loop does. With `eos_id`, a
    finished row gets `eos_id` while the others go on, and the steps end once every row has
    produced it. pad_mask: see hidden_states.

    The decode steps' matrix-vector products go through instructkit/parallel_matvec.py, as
    fast_gpt's do: split over the CPU's cores where a measurement on the first steps shows it
    faster (the same products, so the same tokens); at batch 1 in fp32 the whole step can
    also run in C (instructkit/native_decode.py), where it is faster.
    """
    kv_cache = None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    # batch 1 in fp32: the whole step in one C call can be a path too (instructkit/native_decode.py)
    matvec = MatvecChooser.for_generation(model, idx, pad_mask)
    native = matvec.paths.get("native")
    for _ in range(max_new_tokens):
        if idx.shape[1] <= context_size:
            if kv_cache is None:  # prefill: the whole prompt once
                kv_cache = KVCache(model, idx.shape[0], min(context_size, idx.shape[1] + max_new_tokens))
                hidden = hidden_states(model, idx, kv_cache, pad_mask)
                logits = last_position_logits(model.out_head, hidden)  # (batch, vocab_size)
            else:  # decode: the newest token only, with the chosen (or calibrating) products
                with matvec.step() as path:
                    if path is native:  # blocks, final norm and head in one call
                        logits = native.step(idx[:, -1:], kv_cache)
                    else:  # a DecodeLinear: the products split or not
                        hidden = hidden_states(model, idx[:, -1:], kv_cache, pad_mask, path)
                        logits = last_position_logits(model.out_head, hidden, path)
        else:
            mask_cond = None if pad_mask is None else pad_mask[:, -context_size:]
            linear = matvec.current()  # a whole window: not a step to time
            hidden = hidden_states(model, idx[:, -context_size:], pad_mask=mask_cond, linear=linear)
            logits = last_position_logits(model.out_head, hidden, linear)

        idx_next = sample_next_token(logits, temperature, top_k)  # (batch, 1)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished = finished | (idx_next[:, 0] == eos_id)
            if finished.all():
                return
        yield idx_next
        idx = torch.cat((idx, idx_next), dim=1)
        if pad_mask is not None:
            pad_mask = torch.cat((pad_mask, torch.ones_like(pad_mask[:, :1])), dim=1)


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
             decode_dtype=None):
    """KV-cached twin of previous_chapters.generate: prompt + new tokens (batch, n + new).

    decode_dtype: fast_gpt's option, accepted for the same calls; only None is supported."""
    _check_decode_dtype(decode_dtype)
    steps = generation_steps(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id)
    return torch.cat([idx, *steps], dim=1)


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
                    decode_dtype=None):
    """Yield each new token id (int) for one prompt idx (1, n_tokens), stopping before eos_id."""
    _check_decode_dtype(decode_dtype)
    if idx.shape[0] != 1:
        raise ValueError(f"generate_stream takes one prompt (1, n_tokens), got {tuple(idx.shape)}")
    for idx_next in generation_steps(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id):
        yield idx_next.item()


def generate_batch(model, prompts, max_new_tokens, context_size, eos_id, pad_id=None,
                   decode_dtype=None):
    """Greedy answers for token-id lists of different lengths, generated together.

    The prompts are left-padded into one batch; positions and attention ignore the padding.
    Returns, for every prompt, its new token ids up to (not including) its first `eos_id`.
    """
    _check_decode_dtype(decode_dtype)
    pad_id = eos_id if pad_id is None else pad_id
    device = model.tok_emb.weight.device
    longest = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pad_mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        pad_mask[row, longest - len(prompt):] = True
    steps = generation_steps(model, idx.to(device), max_new_tokens, context_size, eos_id=eos_id,
                             pad_mask=pad_mask.to(device))
    new = torch.cat([idx[:, :0].to(device), *steps], dim=1)  # (batch, steps)
    return [row[:row.index(eos_id)] if eos_id in row else row for row in new.tolist()]


def generate_answer_ids(model, prompts, max_new_tokens, context_size, eos_id, batch_size=16,
                        progress=False, decode_dtype=None, pad_id=None):
    """`generate_batch` over many prompts, `batch_size` at a time, sorted by length (less
    padding); the answers come back in the prompts' order. pad_id: see generate_batch."""
    _check_decode_dtype(decode_dtype)
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    with tqdm(total=len(prompts), disable=not progress, desc="Generating responses") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = generate_batch(model, [prompts[i] for i in rows], max_new_tokens,
                                   context_size, eos_id=eos_id, pad_id=pad_id)
            for i, answer in zip(rows, batch, strict=True):
                answers[i] = answer
            bar.update(len(rows))
    return answers


#####################################
# Loss
#####################################

def loss_sum_and_count(input_batch, target_batch, model, device, chunk_rows=LOSS_CHUNK_ROWS):
    """(sum of the token losses, number of counted targets) of calc_loss_batch's loss.

    Each row is cut after its last counted target (attention is causal: what follows
    changes nothing before it) and the rows are packed into one sequence; the output head
    runs only where a target counts, `chunk_rows` rows at a time.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    counted = target_batch != -100  # (batch, n_tokens)
    n_tokens = counted.shape[1]
    ends = torch.where(counted, torch.arange(1, n_tokens + 1, device=counted.device), 0).amax(1)
    keep = torch.arange(n_tokens, device=counted.device) < ends[:, None]  # a prefix of each row
    packed = PackedRows(keep)
    hidden = transform(model, packed.pack(input_batch), packed.positions, packed)  # (1, kept, emb_dim)
    loss_sum = head_loss_sum(model.out_head, hidden[0][counted[keep]], target_batch[counted], chunk_rows)
    return loss_sum, counted.sum()


def calc_loss_batch_packed(input_batch, target_batch, model, device):
    """calc_loss_batch's loss (the mean over counted targets) without wasted compute."""
    loss_sum, count = loss_sum_and_count(input_batch, target_batch, model, device)
    return loss_sum / count


def calc_loss_loader_fast(data_loader, model, device, num_batches=None):
    """calc_loss_loader's mean batch loss, through calc_loss_batch_packed; nan if empty."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    batches = itertools.islice(data_loader, num_batches)
    return sum(calc_loss_batch_packed(x, y, model, device).item() for x, y in batches) / num_batches


def evaluate_model_fast(model, train_loader, val_loader, device, eval_iter):
    """evaluate_model's (train loss, val loss) under inference mode and autocast."""
    model.eval()
    with torch.inference_mode(), autocast(device):
        train_loss = calc_loss_loader_fast(train_loader, model, device, eval_iter)
        val_loss = calc_loss_loader_fast(val_loader, model, device, eval_iter)
    model.train()
    return train_loss, val_loss


#####################################
# Training: the chapter's loop
#####################################

def print_sample(model, tokenizer, device, start_context):
    """fast_gpt.print_sample for these families: 50 greedy tokens after `start_context`
    through the KV cache, prompt and answer on one line. A BOS the tokenizer adds (Llama 3's
    `<|begin_of_text|>`) is not printed, so the line reads as GPT-2's does."""
    from instructkit.console import print_text

    model.eval()
    encoded = tokenizer.encode(start_context)
    token_ids = generate(model, torch.tensor([encoded], device=device), max_new_tokens=50,
                         context_size=context_size(model))[0].tolist()
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None and token_ids[:1] == [bos_id]:
        token_ids = token_ids[1:]
    print_text(tokenizer.decode(token_ids).replace("\n", " "))  # compact one-line print
    model.train()


def train_model_fast(model, train_loader, val_loader, optimizer, device, num_epochs,
                     eval_freq, eval_iter, start_context, tokenizer):
    """fast_gpt.train_model_fast for Qwen3 and Llama models: train_model_simple's loop, printed
    lines and returned (train losses, val losses, tokens seen), on the packed chunked loss
    (fast_gpt's loop and step, with this module's loss, evaluation and print_sample).

    `start_context=None` skips the sample printed after each epoch."""
    return training_loop(sys.modules[__name__], model, train_loader, val_loader, optimizer,
                         device, num_epochs, eval_freq, eval_iter, start_context, tokenizer)
