"""Speed-ups for the book's GPT model, kept beside the book's plain code (previous_chapters.py).

What it adds, for ANY model with the book's module layout (previous_chapters.GPTModel, the
same model with LoRA layers, or any other book-style implementation with the same submodule
names); it reads `tok_emb`, `pos_emb`, `drop_emb`, `trf_blocks[i].{norm1, att, ff, norm2}`
and the block's residual dropout (`drop_resid` in the book's chapter 6 and 7 code and in
previous_chapters.py, `drop_shortcut` in chapters 4 and 5: whichever the block has),
`final_norm` and `out_head`, and runs its own forward pass over them, so it never subclasses
or patches the model and state dicts are unchanged:

- fused kernels: F.scaled_dot_product_attention, F.layer_norm (the module's scale, shift and
  eps) and F.gelu(approximate="tanh"), the same formulas as the book's explicit code;
- its own sampling (`sample_next_token`: the top-k filter and temperature of
  previous_chapters.generate, the same operations, so the same tokens for the same seed);
- a key/value cache for generation (`generate`, `generate_stream`): each step computes one
  new position instead of the whole context;
- batched generation of left-padded prompts (`generate_batch`, `generate_answer_ids`):
  positions and attention ignore the padding, so each answer is the one-prompt answer;
- decode steps at the memory limit: a step reads every weight for a few rows, and its
  matrix-vector products (the output head included) are split over the CPU's cores where a
  short measurement on the first steps finds that faster (instructkit/parallel_matvec.py;
  forced by --decode-matvec or INSTRUCTKIT_DECODE_MATVEC), and at batch 1 in fp32 the whole
  step may run in one C call instead (instructkit/native_decode.py, the same measurement
  decides); `decode_dtype=torch.bfloat16`
  decodes with bfloat16 copies of the weights (half the bytes; off by default, tokens may
  differ). The functions below take a `linear(module, x)` argument for this; `call_module`,
  the default, is the plain path;
- the packed training loss (`calc_loss_batch_packed`): no compute for padding, output-head
  logits only where a target counts;
- a trainer (`train_model_fast`) with train_model_simple's signature, printed lines and
  outputs: the packed loss, evaluation under torch.inference_mode, bfloat16 autocast on a
  CUDA GPU with bfloat16 hardware; `make_optimizer` gives a fused AdamW where torch has one;
  `compile_blocks` torch.compiles this module's block function per block.

How much faster, measured (benchmarks/results-cpu.txt: gpt2-small, random weights, 256 new
tokens, a quiet 2-core CPU; that file says exactly what was run): training tokens/s 1.55x,
greedy generation at batch 1 8.9x, answering all 110 test prompts 28x (batches of 8 against
the book's loop one prompt at a time); for gpt2-medium (results-cpu-gpt2-medium.txt) 1.71x,
7.4x and 38x.

Tests proving it equal to the plain path (tests/test_fast_gpt.py): the same greedy tokens as
previous_chapters.generate, single, batched with per-row eos, left-padded, streamed, and
past the context length; the same sampled tokens for the same seed; the same losses and
gradients within float tolerance; the same weights (to 1e-4) after AdamW steps of
train_model_fast and train_model_simple. Generation, losses and gradients are checked on the
project's GPTModel (the book's chapter 7 code, `drop_resid`), on it with LoRA layers and on
tests/book_reference.py's independent implementation (`drop_shortcut`); training on the
first two. tests/test_decode_matvec.py: the split and the plain decode products, each forced,
give previous_chapters.generate's greedy tokens (batch 1, batched, left-padded, past the
context length; the project's model and a LoRA model). tests/test_weights.py: with GPT-2's
weights loaded, this module's forward gives the logits of an independent NumPy GPT-2.
"""

import itertools
import sys
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from instructkit.console import print_text  # Not in the book: prints that never crash a run
from instructkit.parallel_matvec import MatvecChooser  # Not in the book: decode steps' products, or C
from instructkit.precision import cuda_bf16_supported  # Not in the book: which GPUs compute in bfloat16
from previous_chapters import text_to_token_ids, token_ids_to_text

# The compiled block function for the transformer blocks that compile_blocks was given. Weak
# keys: the model is left untouched, and its blocks are forgotten here when it is deleted.
_COMPILED_BLOCKS = weakref.WeakKeyDictionary()


#####################################
# The forward pass over the book's modules
#####################################

class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Preallocated for `max_len` positions, one (batch, heads, max_len, head_dim) tensor per
    layer, so each decoding step writes one slot instead of concatenating (and copying) the
    whole history. The heads are the attention's key/value heads: all of them for GPT-2,
    `num_kv_groups` for the grouped-query models of instructkit/fast_llm.py.
    """

    def __init__(self, model, batch_size, max_len):
        att = model.trf_blocks[0].att
        heads = getattr(att, "num_kv_groups", att.num_heads)
        weight = model.tok_emb.weight
        shape = (batch_size, heads, max_len, att.head_dim)
        self.keys = [weight.new_empty(shape) for _ in model.trf_blocks]
        self.values = [weight.new_empty(shape) for _ in model.trf_blocks]
        self.length = 0  # positions stored so far

    def append(self, layer_idx, keys, values):
        """Store keys, values (batch, heads, n_tokens, head_dim) after the cached positions of
        layer `layer_idx`; returns that layer's keys and values so far (views, no copies)."""
        start, end = self.length, self.length + keys.shape[2]
        layer_keys, layer_values = self.keys[layer_idx], self.values[layer_idx]
        layer_keys[:, :, start:end] = keys
        layer_values[:, :, start:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]


class PackedRows:
    """The rows of a batch cut to different lengths and packed into one sequence.

    `keep` (batch, n_tokens) bool is True on a prefix of every row. The model then runs on
    the (1, kept tokens) sequence `pack(in_idx)`: every layer but attention works position by
    position, so the cut-off positions cost nothing there; attention unpacks its queries,
    keys and values to (batch, n_tokens) (zeros where cut) and stays causal, so every kept
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


def layer_norm(norm, x):
    """The book's LayerNorm (mean, biased variance, eps, scale, shift) as one fused kernel."""
    return F.layer_norm(x, (x.shape[-1],), norm.scale, norm.shift, norm.eps)


def call_module(module, x):
    """The plain path's linear layer: the module itself (a LoRA-wrapped one too)."""
    return module(x)


def linear_each(linear, modules, x):
    """[linear(module, x) for module in modules]: the attention's queries, keys and values."""
    return [linear(module, x) for module in modules]


def feed_forward(ff, x, linear=call_module):
    """ff.layers = (Linear, GELU, Linear); the linears are called (LoRA-wrapped ones too)."""
    return linear(ff.layers[2], F.gelu(linear(ff.layers[0], x), approximate="tanh"))


def attention(att, x, attn_mask=None, kv_cache=None, layer_idx=0, linear=call_module):
    """The book's multi-head attention through F.scaled_dot_product_attention.

    x: (batch, n_tokens, d_in), or (1, kept, d_in) when attn_mask is a PackedRows.
    attn_mask: None for plain causal attention, a bool tensor (batch or 1, 1, n_tokens,
    n_keys) True where a query may attend, or a PackedRows (causal within each row).
    kv_cache: a KVCache these keys and values are appended to, attending over all of it.
    linear: how the linear layers are called, `linear(module, x)`: the module itself, or a
    decode step's parallel_matvec.DecodeLinear.
    """
    queries, keys, values = linear_each(linear, (att.W_query, att.W_key, att.W_value), x)
    packed = attn_mask if isinstance(attn_mask, PackedRows) else None
    if packed is not None:  # back to (batch, n_tokens, d_out) for attention
        queries, keys, values = packed.unpack(queries), packed.unpack(keys), packed.unpack(values)
        attn_mask = None
    b, num_tokens, d_out = queries.shape

    # (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
    queries = queries.view(b, num_tokens, att.num_heads, att.head_dim).transpose(1, 2)
    keys = keys.view(b, num_tokens, att.num_heads, att.head_dim).transpose(1, 2)
    values = values.view(b, num_tokens, att.num_heads, att.head_dim).transpose(1, 2)

    start = 0  # positions already cached
    if kv_cache is not None:  # append to the cache, attend over all cached positions
        start = kv_cache.length
        keys, values = kv_cache.append(layer_idx, keys, values)

    context_vec = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=attn_mask,
        dropout_p=att.dropout.p if att.training else 0.0,
        # plain causal attention when the keys are exactly these tokens
        is_causal=attn_mask is None and start == 0,
    )  # (b, num_heads, num_tokens, head_dim)
    context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, d_out)
    if packed is not None:
        context_vec = packed.pack(context_vec)
    return linear(att.out_proj, context_vec)


# The residual dropout's names in the book: `drop_resid` in its chapter 6 and 7 code (and so
# in previous_chapters.py), `drop_shortcut` in chapters 4 and 5. A dropout holds no
# parameters, so the state dicts are the same either way.
RESIDUAL_DROPOUT_NAMES = ("drop_resid", "drop_shortcut")


def residual_dropout(block):
    """The block's dropout before each residual addition, by whichever name the block has."""
    for name in RESIDUAL_DROPOUT_NAMES:
        dropout = getattr(block, name, None)
        if dropout is not None:
            return dropout
    raise AttributeError(f"{type(block).__name__} has no residual dropout: expected one of "
                         f"{', '.join(RESIDUAL_DROPOUT_NAMES)} (the book's TransformerBlock layout)")


def apply_dropout(dropout, x):
    """dropout(x). An nn.Dropout in evaluation mode is the identity, so it is not called there: a
    module call costs as much as one of a decode step's small kernels."""
    return x if type(dropout) is nn.Dropout and not dropout.training else dropout(x)


def transformer_block(block, x, attn_mask=None, kv_cache=None, layer_idx=0, linear=call_module):
    """The book's TransformerBlock.forward, through the fused functions above."""
    drop_resid = residual_dropout(block)
    shortcut = x  # pre-LayerNorm attention with a residual connection
    x = attention(block.att, layer_norm(block.norm1, x), attn_mask, kv_cache, layer_idx, linear)
    x = apply_dropout(drop_resid, x) + shortcut

    shortcut = x  # pre-LayerNorm feed-forward with a residual connection
    x = feed_forward(block.ff, layer_norm(block.norm2, x), linear)
    return apply_dropout(drop_resid, x) + shortcut


def transform(model, in_idx, positions, attn_mask=None, kv_cache=None, linear=call_module):
    """Embeddings, the transformer blocks and the final norm: (batch, n_tokens, emb_dim).

    positions: (n_tokens,) or (batch, n_tokens) position ids for pos_emb. linear: see attention.
    """
    x = apply_dropout(model.drop_emb, model.tok_emb(in_idx) + model.pos_emb(positions))
    compiled = kv_cache is None and linear is call_module  # compiled blocks: the plain path only
    for layer_idx, block in enumerate(model.trf_blocks):
        run = _COMPILED_BLOCKS.get(block, transformer_block) if compiled else transformer_block
        x = run(block, x, attn_mask, kv_cache, layer_idx, linear)
    if kv_cache is not None:
        kv_cache.length += in_idx.shape[1]
    return layer_norm(model.final_norm, x)


def hidden_states(model, in_idx, kv_cache=None, pad_mask=None, linear=call_module):
    """Everything but the output head, continuing `kv_cache` when given.

    pad_mask: (batch, cached + n_tokens) bool, False at left-padding positions; each row's
        positions then count from its first real token, as if it had no padding.
    linear: see attention.
    """
    start = kv_cache.length if kv_cache is not None else 0
    positions, attn_mask = positions_and_mask(start, in_idx.shape[1], pad_mask, in_idx.device)
    return transform(model, in_idx, positions, attn_mask, kv_cache, linear)


def positions_and_mask(start, seq_len, pad_mask, device):
    """(position ids, attention mask) of seq_len new tokens after `start` cached ones.

    positions: (seq_len,), or (batch, seq_len) counted from each row's first real token
    when pad_mask (batch, start + seq_len) marks left padding with False. attn_mask: None
    for plain causal attention, else (batch or 1, 1, seq_len, start + seq_len) bool, True
    where a query may attend (instructkit/fast_llm.py's RoPE models use it too).
    """
    attn_mask = None
    if pad_mask is None:
        positions = torch.arange(start, start + seq_len, device=device)
        if start > 0 and seq_len > 1:  # several new tokens after cached ones
            attn_mask = _causal_mask(start, seq_len, device)[None, None]
    else:
        positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + seq_len]
        attn_mask = _causal_mask(start, seq_len, device)[None, None] \
            & pad_mask[:, None, None, :start + seq_len]
        # A padding query would see no key at all (NaN); let every query see itself.
        attn_mask = attn_mask | _diagonal(start, seq_len, device)[None, None]
    return positions, attn_mask


def _causal_mask(start, seq_len, device):
    """(seq_len, start + seq_len) bool: query i (at position start + i) sees keys <= it."""
    rows = torch.arange(start, start + seq_len, device=device)[:, None]
    return torch.arange(start + seq_len, device=device)[None, :] <= rows


def _diagonal(start, seq_len, device):
    """(seq_len, start + seq_len) bool: True where query i meets its own key."""
    rows = torch.arange(start, start + seq_len, device=device)[:, None]
    return torch.arange(start + seq_len, device=device)[None, :] == rows


def compile_blocks(model, **kwargs):
    """torch.compile this module's block function for every transformer block of `model`.

    Training and evaluation here then run the compiled function on each block (kwargs go to
    torch.compile, e.g. dynamic=True since batch lengths vary; blocks of the same shape share
    its graphs); generation keeps a KV cache whose shapes change every step and runs the
    blocks eagerly. The model itself is not modified.
    """
    compiled = torch.compile(transformer_block, **kwargs)  # holds no reference to a block
    for block in model.trf_blocks:
        _COMPILED_BLOCKS[block] = compiled


#####################################
# Generation
#####################################

def sample_next_token(logits, temperature=0.0, top_k=None):
    """The next token (batch, 1) from the last position's logits (batch, vocab_size).

    previous_chapters.generate's top-k filter and temperature sampling, the same operations
    in the same order, so for the same seed both draw the same tokens: the k largest logits
    of each row stay candidates (each row against its own k-th largest), then either the
    largest logit (temperature 0) or a draw from softmax(logits / temperature), computed
    after subtracting each row's largest logit so that exp() cannot overflow.
    """
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)
        min_val = top_logits[:, -1:]  # (batch, 1): each row's own k-th largest logit
        logits = torch.where(logits < min_val, torch.tensor(float("-inf")).to(logits.device), logits)
    if temperature > 0.0:
        logits = logits / temperature
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)  # (batch, vocab_size)
        # Not in the book: on Apple's GPU the draw runs on the CPU, where torch.multinomial never
        # picks a token of probability zero (MPS's can); elsewhere the same call, no copies
        from instructkit.devices import sampling_device

        draw_on = sampling_device(probs.device)
        if draw_on != probs.device:
            return torch.multinomial(probs.to(draw_on), num_samples=1).to(probs.device)
        return torch.multinomial(probs, num_samples=1)  # (batch, 1)
    return torch.argmax(logits, dim=-1, keepdim=True)  # (batch, 1)


def last_position_logits(out_head, hidden, linear=call_module):
    """The output head on the last position of `hidden` (batch, n_tokens, emb_dim).

    On a CPU, for the few rows of a decoding step, weight @ hidden^T is the faster way round
    for MKL (it streams the 50,257 x emb_dim matrix instead of repacking it): about 15% less
    time per step at batch 8. Elsewhere, and for a LoRA head, the plain module call. A decode
    step's DecodeLinear (split over the cores, or bfloat16 weights) does its own product.
    """
    last = hidden[:, -1, :]  # (batch, emb_dim)
    if linear is not call_module and not getattr(linear, "is_reference", False):
        return linear(out_head, last)
    if type(out_head) is nn.Linear and out_head.bias is None and last.device.type == "cpu":
        return (out_head.weight @ last.T).T.contiguous()
    return out_head(last)


@torch.inference_mode()
def generation_steps(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None,
                     eos_id=None, pad_mask=None, decode_dtype=None):
    """Yield the next tokens (batch, 1), step after step, as previous_chapters.generate picks them.

    The prompt runs once (prefill), then only the newest token (KV cache). Past the context
    length the positions shift every step, so the cropped window is recomputed. With
    `eos_id`, a finished row gets `eos_id` while the others go on, and the steps end (without
    yielding) once every row has produced it. pad_mask: see hidden_states.

    The decode steps read every weight once for a few rows: their matrix-vector products go
    through instructkit/parallel_matvec.py, split over the CPU's cores where a measurement on
    the first steps shows it faster (the same products, so the same tokens); at batch 1 in
    fp32 the whole step can also run in C (instructkit/native_decode.py), where it is faster.
    decode_dtype: torch.bfloat16 to decode with bfloat16 copies of the linear layers' weights
    (half the bytes to read; tokens may differ); None (default) for the model's own weights.
    The prefill always runs on the model's own weights.
    """
    kv_cache = None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    # batch 1 in fp32: the whole step in one C call can be a path too (instructkit/native_decode.py)
    matvec = MatvecChooser.for_generation(model, idx, pad_mask, decode_dtype)
    native = matvec.paths.get("native")
    for _ in range(max_new_tokens):
        if idx.shape[1] <= context_size:
            if kv_cache is None:  # prefill: the whole prompt once
                kv_cache = KVCache(model, idx.shape[0], min(context_size, idx.shape[1] + max_new_tokens))
                hidden = hidden_states(model, idx, kv_cache, pad_mask)
                logits = last_position_logits(model.out_head, hidden)  # (batch, vocab_size)
            else:  # decode: only the newest token, with the chosen (or calibrating) products
                with matvec.step() as path:
                    if path is native:  # blocks, final norm and head in one call
                        logits = native.step(idx[:, -1:], kv_cache)
                    else:  # a DecodeLinear: the book's blocks, its products split or not
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
    """KV-cached twin of previous_chapters.generate: the same tokens, prompt + new ones.

    decode_dtype: see generation_steps (None, the default, for the same tokens)."""
    steps = generation_steps(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id,
                             decode_dtype=decode_dtype)
    return torch.cat([idx, *steps], dim=1)


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None,
                    eos_id=None, decode_dtype=None):
    """Yield each new token id (int) for one prompt idx (1, n_tokens), stopping before eos_id.

    The tokens are `generate`'s; a chat prints them as they come.
    """
    if idx.shape[0] != 1:
        raise ValueError(f"generate_stream takes one prompt (1, n_tokens), got {tuple(idx.shape)}")
    for idx_next in generation_steps(model, idx, max_new_tokens, context_size, temperature,
                                     top_k, eos_id, decode_dtype=decode_dtype):
        yield idx_next.item()


def generate_batch(model, prompts, max_new_tokens, context_size, eos_id, pad_id=None,
                   decode_dtype=None):
    """Greedy answers for token-id lists of different lengths, generated together.

    The prompts are left-padded into one batch; positions and attention ignore the padding,
    so each answer equals what `generate` gives for that prompt alone. Returns, for every
    prompt, the list of new token ids up to (not including) its first `eos_id`.
    """
    pad_id = eos_id if pad_id is None else pad_id
    device = model.tok_emb.weight.device
    longest = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pad_mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        pad_mask[row, longest - len(prompt):] = True
    steps = generation_steps(model, idx.to(device), max_new_tokens, context_size, eos_id=eos_id,
                             pad_mask=pad_mask.to(device), decode_dtype=decode_dtype)
    new = torch.cat([idx[:, :0].to(device), *steps], dim=1)  # (batch, steps)
    return [row[:row.index(eos_id)] if eos_id in row else row for row in new.tolist()]


def generate_answer_ids(model, prompts, max_new_tokens, context_size, eos_id, batch_size=16,
                        progress=False, decode_dtype=None):
    """`generate_batch` over many token-id prompts, `batch_size` at a time.

    Prompts are sorted by length so a batch holds similar lengths (less padding); the
    answers (new token ids, up to the first `eos_id`) come back in the prompts' order.
    """
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    with tqdm(total=len(prompts), disable=not progress, desc="Generating responses") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = generate_batch(model, [prompts[i] for i in rows], max_new_tokens,
                                   context_size, eos_id=eos_id, decode_dtype=decode_dtype)
            for i, answer in zip(rows, batch, strict=True):
                answers[i] = answer
            bar.update(len(rows))
    return answers


#####################################
# Loss and training
#####################################

def packs_rows(device):
    """Whether loss_sum_and_count packs the rows on `device` (a torch.device): everywhere but
    on a CUDA GPU. Packing saves arithmetic, but it needs the number of kept positions on the
    CPU, which waits for the GPU; the chapter's small batches keep a GPU busy for less time
    than the launches of their kernels take, so that wait stalls the whole step. Measured on
    an H200 (gpt2-small, batches of 8 x 61-83 tokens, fused AdamW; README and
    benchmarks/results-cuda-train-steps.txt): 4,298 tokens/s packed against 15,195 over the
    whole batch under bfloat16 autocast, 15,053 against 19,064 in float32/TF32."""
    return device.type != "cuda"


def loss_sum_and_count(input_batch, target_batch, model, device, pack=None):
    """(sum of the token losses, number of counted targets) of calc_loss_batch's loss.

    A row's positions after its last counted target (the padding, target -100) influence no
    counted position, since attention is causal: each row is cut there and the rows are
    packed into one sequence (PackedRows), so the padding costs no compute at all. The output
    head (emb_dim x 50,257, the largest matrix multiply in GPT-2) then runs only where a
    target counts, in the forward and the backward pass. Sums and counts add up across
    batches or processes, weighting each by its tokens.

    pack: None for `packs_rows(device)`; False runs the whole batch through the fused blocks
    and the head, the -100 targets ignored by the loss (no wait for the GPU).
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    counted = target_batch != -100  # (batch, n_tokens)
    if not (packs_rows(input_batch.device) if pack is None else pack):
        logits = model.out_head(hidden_states(model, input_batch))  # (batch, n_tokens, vocab_size)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten(),
                                   ignore_index=-100, reduction="sum")
        return loss_sum, counted.sum()
    n_tokens = counted.shape[1]
    # Each row up to and including its last counted target: a prefix of the row.
    ends = torch.where(counted, torch.arange(1, n_tokens + 1, device=counted.device), 0).amax(1)
    keep = torch.arange(n_tokens, device=counted.device) < ends[:, None]  # (batch, n_tokens)
    packed = PackedRows(keep)
    hidden = transform(model, packed.pack(input_batch), packed.positions, packed)  # (1, kept, emb_dim)
    logits = model.out_head(hidden[0][counted[keep]])  # (n_counted, vocab_size)
    loss_sum = F.cross_entropy(logits.float(), target_batch[counted], reduction="sum")
    return loss_sum, counted.sum()


def calc_loss_batch_packed(input_batch, target_batch, model, device):
    """calc_loss_batch's loss (the mean over counted targets) without wasted compute (packed
    rows, except on a CUDA GPU: see packs_rows)."""
    loss_sum, count = loss_sum_and_count(input_batch, target_batch, model, device)
    return loss_sum / count


def calc_loss_loader_fast(data_loader, model, device, num_batches=None):
    """calc_loss_loader's mean batch loss, through calc_loss_batch_packed; nan if empty."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    batches = itertools.islice(data_loader, num_batches)
    return sum(calc_loss_batch_packed(x, y, model, device).item() for x, y in batches) / num_batches


def uses_bf16(device, bf16_supported=cuda_bf16_supported):
    """Whether `autocast(device)` computes in bfloat16: on a CUDA GPU with bfloat16 hardware
    only. torch.cuda.is_bf16_supported() also counts GPUs that emulate it (T4, V100), slowly.
    `bf16_supported(device) -> bool` is asked for CUDA devices only; tests pass a stub."""
    device = torch.device(device)
    return device.type == "cuda" and bf16_supported(device)


def autocast(device):
    """bfloat16 autocast where `uses_bf16(device)` (weights stay float32), else nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=uses_bf16(device))


def evaluate_model_fast(model, train_loader, val_loader, device, eval_iter):
    """evaluate_model's (train loss, val loss) under inference mode and autocast."""
    model.eval()
    with torch.inference_mode(), autocast(device):
        train_loss = calc_loss_loader_fast(train_loader, model, device, eval_iter)
        val_loss = calc_loss_loader_fast(val_loader, model, device, eval_iter)
    model.train()
    return train_loss, val_loss


def train_step(model, optimizer, input_batch, target_batch, device, calc_loss=None):
    """One optimizer step on the packed loss; returns the loss (a tensor). `calc_loss`: the
    family's packed loss (instructkit.fast_llm's for Qwen3 and Llama; default: this module's)."""
    calc_loss = calc_loss or calc_loss_batch_packed
    optimizer.zero_grad()
    with autocast(device):
        loss = calc_loss(input_batch, target_batch, model, device)
    loss.backward()
    optimizer.step()
    return loss


def print_sample(model, tokenizer, device, start_context):
    """generate_and_print_sample through the KV cache: 50 greedy tokens on one line."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens=50, context_size=context_size)
    # print_text: "?" for a character the console cannot encode (a Windows code page into a
    # file or a pipe) rather than a UnicodeEncodeError that ends the training
    print_text(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))  # compact one-line print
    model.train()


def train_model_fast(model, train_loader, val_loader, optimizer, device, num_epochs,
                     eval_freq, eval_iter, start_context, tokenizer):
    """train_model_simple's loop, outputs and printed lines, with less work per step.

    Returns train_losses, val_losses, tokens_seen. `start_context=None` skips the per-epoch
    sample. Pass it `make_optimizer(...)` for a fused AdamW where PyTorch has one.
    """
    return training_loop(sys.modules[__name__], model, train_loader, val_loader, optimizer,
                         device, num_epochs, eval_freq, eval_iter, start_context, tokenizer)


def training_loop(family, model, train_loader, val_loader, optimizer, device, num_epochs,
                  eval_freq, eval_iter, start_context, tokenizer):
    """train_model_simple's loop on a fast path's own pieces: `family` is this module (GPT-2)
    or instructkit.fast_llm (Qwen3, Llama), each with calc_loss_batch_packed,
    evaluate_model_fast and print_sample. Returns (train losses, val losses, tokens seen)."""
    history = ([], [], [])  # train losses, validation losses, tokens seen
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            train_step(model, optimizer, input_batch, target_batch, device,
                       family.calc_loss_batch_packed)
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                losses = family.evaluate_model_fast(model, train_loader, val_loader, device,
                                                    eval_iter)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {losses[0]:.3f}, Val loss {losses[1]:.3f}")
                for values, value in zip(history, (*losses, tokens_seen), strict=True):
                    values.append(value)
        if start_context is not None:
            family.print_sample(model, tokenizer, device, start_context)
    return history


def make_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters: fused (one kernel for all) where torch has it.

    Fused where this torch lists the parameters' device among its fused-kernel devices (and
    accepts fused=True at construction); otherwise the plain AdamW, the same update.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if _fused_adamw_supported({p.device.type for p in params}):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):  # older torch: no fused AdamW for this device
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _fused_adamw_supported(device_types):
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the list: leave it to AdamW's own check
        return True
    return bool(device_types) and device_types <= set(_get_fused_kernels_supported_devices())
