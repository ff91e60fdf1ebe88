"""Code from chapters 2 to 6 that chapter 7 builds on.

The GPT model (chapter 4), text generation (chapters 4 and 5), the loss and training helpers
(chapter 5), loading OpenAI's GPT-2 weights (chapter 5), and LoRA (appendix E, exercise 7.4).
Names, signatures and state-dict keys are the book's, so checkpoints move freely between the
book's model and this one. What this file adds is marked `# New:`: a key/value cache for
fast generation, PyTorch's fused attention, and a training loop that skips wasted work.
"""

import contextlib
import math

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.ticker import MaxNLocator

#####################################
# Chapter 4: the GPT model
#####################################

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # vocabulary size of the GPT-2 tokenizer
    "context_length": 1024,  # longest input the model attends over
    "emb_dim": 768,          # embedding dimension
    "n_heads": 12,           # attention heads per layer
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.0,        # dropout (GPT-2 was trained without it here)
    "qkv_bias": True,        # GPT-2 has biases in the query/key/value projections
}

# The four GPT-2 sizes differ only in width and depth.
MODEL_CONFIGS = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


def gpt2_config(model_name):
    """The full GPTModel config for one of MODEL_CONFIGS' names, e.g. 'gpt2-medium (355M)'."""
    if model_name not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model {model_name!r}; choose one of {list(MODEL_CONFIGS)}")
    return {**GPT_CONFIG_124M, **MODEL_CONFIGS[model_name]}


class KVCache:
    """New: keys and values of every layer for the positions seen so far.

    Preallocated for `max_len` positions, so each decoding step writes one slot instead of
    concatenating (and copying) the whole history.
    """

    def __init__(self, n_layers, batch_size, n_heads, max_len, head_dim, device, dtype):
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions stored so far


class PackedRows:
    """New: the rows of a batch cut to different lengths and packed into one sequence.

    `keep` (batch, n_tokens) bool is True on a prefix of every row. The model then runs on
    the (1, kept tokens) sequence `pack(in_idx)`: every layer but attention works position by
    position, so the cut-off positions cost nothing there; attention unpacks its queries,
    keys and values to (batch, n_tokens) (zeros where cut) and stays causal, so every kept
    position sees exactly the tokens it sees in the full batch. Used by calc_loss_batch_fast.
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


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False,
                 use_sdpa=True):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # Kept (and saved in the state dict) for compatibility with the book's checkpoints.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        # New: PyTorch's fused scaled_dot_product_attention; False gives the book's explicit code.
        self.use_sdpa = use_sdpa

    def forward(self, x, attn_mask=None, kv_cache=None, layer_idx=0):
        """x: (batch, n_tokens, d_in). attn_mask (New): None for plain causal attention, else
        a bool tensor (batch or 1, 1, n_tokens, n_keys), True where a query may attend, or a
        PackedRows when x holds packed rows (plain causal attention within each row)."""
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        packed = attn_mask if isinstance(attn_mask, PackedRows) else None
        if packed is not None:  # New: back to (batch, n_tokens, d_out) for attention
            queries, keys, values = packed.unpack(queries), packed.unpack(keys), packed.unpack(values)
            attn_mask = None
        b, num_tokens, _ = queries.shape

        # (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        start = 0  # positions already cached
        if kv_cache is not None:  # New: append to the cache, attend over all cached positions
            start, end = kv_cache.length, kv_cache.length + num_tokens
            kv_cache.keys[layer_idx, :, :, start:end] = keys
            kv_cache.values[layer_idx, :, :, start:end] = values
            keys = kv_cache.keys[layer_idx, :, :, :end]
            values = kv_cache.values[layer_idx, :, :, :end]
        # Plain causal attention when the keys are exactly these tokens (a Python bool, also
        # under torch.compile with dynamic shapes).
        causal = attn_mask is None and start == 0

        if self.use_sdpa:
            context_vec = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=attn_mask,
                dropout_p=self.dropout.p if self.training else 0.0, is_causal=causal,
            )
        else:  # the book's explicit attention
            attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, n_keys)
            if causal:
                mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
                attn_scores.masked_fill_(mask_bool, -torch.inf)
            elif attn_mask is not None:
                attn_scores = attn_scores.masked_fill(~attn_mask, -torch.inf)
            attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            attn_weights = self.dropout(attn_weights)
            context_vec = attn_weights @ values  # (b, num_heads, num_tokens, head_dim)

        context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        if packed is not None:
            context_vec = packed.pack(context_vec)
        return self.out_proj(context_vec)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # New: the fused kernel; same formula as the book's mean/biased-variance version.
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    def forward(self, x):
        # The tanh approximation GPT-2 was trained with, as one fused kernel.
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
            use_sdpa=cfg.get("use_sdpa", True),
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, attn_mask=None, kv_cache=None, layer_idx=0):
        shortcut = x  # pre-LayerNorm attention with a residual connection
        x = self.att(self.norm1(x), attn_mask, kv_cache, layer_idx)
        x = self.drop_shortcut(x) + shortcut

        shortcut = x  # pre-LayerNorm feed-forward with a residual connection
        x = self.ff(self.norm2(x))
        return self.drop_shortcut(x) + shortcut


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx, kv_cache=None, pad_mask=None):
        """in_idx: (batch, n_tokens) token ids -> logits (batch, n_tokens, vocab_size)."""
        return self.out_head(self.hidden_states(in_idx, kv_cache, pad_mask))

    def hidden_states(self, in_idx, kv_cache=None, pad_mask=None):
        """New: everything but the output head: (batch, n_tokens, emb_dim).

        kv_cache: a KVCache (from `new_kv_cache`) that this call appends to.
        pad_mask: (batch, cached + n_tokens) bool, False at left-padding positions; each row's
            positions then count from its first real token, as if it had no padding.
        """
        batch_size, seq_len = in_idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        attn_mask = None
        if pad_mask is None:
            positions = torch.arange(start, start + seq_len, device=in_idx.device)
            if start > 0 and seq_len > 1:  # several new tokens after cached ones
                attn_mask = _causal_mask(start, seq_len, in_idx.device)[None, None]
        else:
            positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + seq_len]
            attn_mask = _causal_mask(start, seq_len, in_idx.device)[None, None] \
                & pad_mask[:, None, None, :start + seq_len]
            # A padding query would see no key at all (NaN); let every query see itself.
            attn_mask = attn_mask | _diagonal(start, seq_len, in_idx.device)[None, None]

        return self._transform(in_idx, positions, attn_mask, kv_cache)

    def _transform(self, in_idx, positions, attn_mask=None, kv_cache=None):
        """Embeddings, the transformer blocks and the final norm, for given positions and mask."""
        tok_embeds = self.tok_emb(in_idx)  # (batch, n_tokens, emb_dim)
        pos_embeds = self.pos_emb(positions)  # (n_tokens, emb_dim) or (batch, n_tokens, emb_dim)
        x = self.drop_emb(tok_embeds + pos_embeds)
        for layer_idx, block in enumerate(self.trf_blocks):
            x = block(x, attn_mask, kv_cache, layer_idx)
        if kv_cache is not None:
            kv_cache.length += in_idx.shape[1]
        return self.final_norm(x)

    def compile(self, *args, **kwargs):
        """New: torch.compile every transformer block in place (arguments go to torch.compile).

        The blocks do the work of every path (training, evaluation, prefill), while
        GPTModel.forward is skipped by calc_loss_batch_fast and the KV cache; compiling the
        blocks speeds them all up. The state dict is unchanged. `generate` runs the blocks
        eagerly while it keeps a KV cache: the shapes change at every step.
        """
        for block in self.trf_blocks:
            block.compile(*args, **kwargs)

    def new_kv_cache(self, batch_size, max_len=None):
        """New: an empty KVCache for `batch_size` sequences of up to `max_len` positions."""
        att = self.trf_blocks[0].att
        return KVCache(len(self.trf_blocks), batch_size, att.num_heads,
                       max_len or self.cfg["context_length"], att.head_dim,
                       self.tok_emb.weight.device, self.tok_emb.weight.dtype)


def _causal_mask(start, seq_len, device):
    """(seq_len, start + seq_len) bool: query i (at position start + i) sees keys <= it."""
    rows = torch.arange(start, start + seq_len, device=device)[:, None]
    return torch.arange(start + seq_len, device=device)[None, :] <= rows


def _diagonal(start, seq_len, device):
    """(seq_len, start + seq_len) bool: True where query i meets its own key."""
    rows = torch.arange(start, start + seq_len, device=device)[:, None]
    return torch.arange(start + seq_len, device=device)[None, :] == rows


#####################################
# Chapters 4 and 5: text generation
#####################################

def generate_text_simple(model, idx, max_new_tokens, context_size):
    """Greedy decoding, recomputing the whole context for every new token."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # (batch, n_tokens) -> at most context_size tokens
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (batch, vocab_size): only the last position predicts
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (batch, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def sample_next_token(logits, temperature=0.0, top_k=None):
    """logits: (batch, vocab_size) -> next token ids (batch, 1)."""
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)
        min_val = top_logits[:, -1:]
        logits = torch.where(logits < min_val, torch.tensor(-torch.inf, device=logits.device), logits)
    if temperature > 0.0:
        logits = logits / temperature
        logits = logits - logits.max(dim=-1, keepdim=True).values  # stable softmax
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)


@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
             use_cache=True, pad_mask=None):
    """Generate up to `max_new_tokens` after `idx` (batch, n_tokens); returns prompt + new tokens.

    Greedy when temperature is 0, else sampling from the top_k most likely tokens. With
    `eos_id`, each row stops on its own: a finished row is padded with `eos_id` while the
    others go on, and generation ends once every row has produced it (a single prompt thus
    ends just before its end-of-text token, as in the book).
    New: `use_cache` keeps keys and values between steps (same tokens, far less work);
    `use_cache=False` is the book's loop that recomputes the whole context every step.
    `pad_mask` (batch, n_tokens) bool marks real tokens of left-padded prompts.
    """
    cache_ok = use_cache and isinstance(model, GPTModel)
    with _eager_blocks() if cache_ok else contextlib.nullcontext():
        return _generate(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id,
                         cache_ok, pad_mask)


def _eager_blocks():
    """Compiled code runs eagerly inside (PyTorch >= 2.6; earlier ones just recompile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _generate(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, cache_ok,
              pad_mask):
    kv_cache = None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)

    for _ in range(max_new_tokens):
        if cache_ok and idx.shape[1] <= context_size:
            if kv_cache is None:  # prefill: the whole prompt once
                max_len = min(context_size, idx.shape[1] + max_new_tokens)
                kv_cache = model.new_kv_cache(idx.shape[0], max_len)
                hidden = model.hidden_states(idx, kv_cache, pad_mask)
            else:  # decode: only the newest token
                hidden = model.hidden_states(idx[:, -1:], kv_cache, pad_mask)
            logits = _last_position_logits(model.out_head, hidden)  # (batch, vocab_size)
        else:  # past the context length positions shift every step: recompute the window
            idx_cond = idx[:, -context_size:]
            mask_cond = None if pad_mask is None else pad_mask[:, -context_size:]
            if cache_ok:  # New: the output head only where the next token is predicted
                hidden = model.hidden_states(idx_cond, pad_mask=mask_cond)
                logits = _last_position_logits(model.out_head, hidden)
            elif mask_cond is None:  # the book's loop
                logits = model(idx_cond)[:, -1, :]
            else:
                logits = model(idx_cond, pad_mask=mask_cond)[:, -1, :]

        idx_next = sample_next_token(logits, temperature, top_k)  # (batch, 1)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished = finished | (idx_next[:, 0] == eos_id)
            if finished.all():
                break
        idx = torch.cat((idx, idx_next), dim=1)
        if pad_mask is not None:
            pad_mask = torch.cat((pad_mask, torch.ones_like(pad_mask[:, :1])), dim=1)
    return idx


def _last_position_logits(out_head, hidden):
    """The output head on the last position of `hidden` (batch, n_tokens, emb_dim).

    On a CPU, for the few rows of a decoding step, weight @ hidden^T is the faster way round
    for MKL (it streams the 50,257 x emb_dim matrix instead of repacking it): about 15% less
    time per step at batch 8. Elsewhere, and for a LoRA head, the plain nn.Linear call.
    """
    last = hidden[:, -1, :]  # (batch, emb_dim)
    if type(out_head) is nn.Linear and out_head.bias is None and last.device.type == "cpu":
        return (out_head.weight @ last.T).T.contiguous()
    return out_head(last)


def generate_batch(model, prompts, max_new_tokens, context_size, eos_id, pad_id=None,
                   use_cache=True):
    """New: greedy answers for token-id lists of different lengths, generated together.

    The prompts are left-padded into one batch; positions and attention ignore the padding,
    so each answer equals what `generate` gives for that prompt alone. Returns, for every
    prompt, the list of new token ids up to (not including) its first `eos_id`.
    """
    pad_id = eos_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pad_mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        pad_mask[row, longest - len(prompt):] = True
    out = generate(model, idx.to(device), max_new_tokens, context_size, eos_id=eos_id,
                   use_cache=use_cache, pad_mask=pad_mask.to(device))
    answers = []
    for row in out[:, longest:].tolist():
        answers.append(row[:row.index(eos_id)] if eos_id in row else row)
    return answers


def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(token_ids, tokenizer):
    flat = token_ids.squeeze(0)  # remove the batch dimension
    return tokenizer.decode(flat.tolist())


#####################################
# Chapter 5: loss and training
#####################################

def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (batch, n_tokens, vocab_size)
    # Targets of -100 (padding, masked prompts) are ignored by cross_entropy.
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_batch_fast(input_batch, target_batch, model, device):
    """New: the same loss, without the work that cross_entropy would throw away.

    A row's positions after its last counted target (the padding, target -100) influence no
    counted position, since attention is causal: each row is cut there and the rows are
    packed into one sequence (PackedRows), so the padding costs no compute at all. The output
    head (emb_dim x 50,257, the largest matrix multiply in GPT-2) then runs only where a
    target counts, in the forward and the backward pass.
    """
    if not isinstance(model, GPTModel):
        return calc_loss_batch(input_batch, target_batch, model, device)
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    counted = target_batch != -100  # (batch, n_tokens)
    n_tokens = counted.shape[1]
    # Each row up to and including its last counted target: a prefix of the row.
    ends = torch.where(counted, torch.arange(1, n_tokens + 1, device=counted.device), 0).amax(1)
    keep = torch.arange(n_tokens, device=counted.device) < ends[:, None]  # (batch, n_tokens)
    packed = PackedRows(keep)
    hidden = model._transform(packed.pack(input_batch), packed.positions, packed)  # (1, kept, emb_dim)
    logits = model.out_head(hidden[0][counted[keep]])  # (n_counted, vocab_size)
    return F.cross_entropy(logits.float(), target_batch[counted])


def calc_loss_loader(data_loader, model, device, num_batches=None, loss_fn=calc_loss_batch):
    """Mean batch loss over the first `num_batches` batches (all when None); nan if empty."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += loss_fn(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter, loss_fn=calc_loss_batch):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, loss_fn)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, loss_fn)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context):
    _print_sample(model, tokenizer, device, start_context, use_cache=True)


def _print_sample(model, tokenizer, device, start_context, use_cache):
    """50 greedy tokens after `start_context`, printed on one line."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens=50, context_size=context_size,
                         use_cache=use_cache)
    decoded_text = token_ids_to_text(token_ids, tokenizer)
    print(decoded_text.replace("\n", " "))  # compact one-line print
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer, fast=True):
    """The chapter 5 training loop; returns train_losses, val_losses, tokens_seen.

    New: `fast=True` (default) computes the same losses with less work: no compute at all for
    the padding, no output-head logits for ignored targets (calc_loss_batch_fast), the
    evaluation under torch.inference_mode, and on CUDA bfloat16 autocast (weights stay
    float32). Pass it a fused AdamW (`torch.optim.AdamW(..., fused=True)`) where PyTorch has
    one: on CPU it is several times faster than the default AdamW.
    `fast=False` runs the book's loop unchanged, its per-epoch sample without the KV cache.
    `start_context=None` (New) skips the per-epoch sample.
    """
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    loss_fn = calc_loss_batch_fast if fast else calc_loss_batch
    use_bf16 = fast and torch.device(device).type == "cuda"
    # evaluate_model already turns gradients off; inference mode also skips autograd's bookkeeping
    eval_context = torch.inference_mode if fast else contextlib.nullcontext

    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1

            if global_step % eval_freq == 0:
                with eval_context(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    train_loss, val_loss = evaluate_model(
                        model, train_loader, val_loader, device, eval_iter, loss_fn)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        if start_context is not None:
            _print_sample(model, tokenizer, device, start_context, use_cache=fast)

    return train_losses, val_losses, track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, save_path=None, show=True):
    """Training and validation loss against epochs, with tokens seen on a second x-axis.

    New: `save_path` also writes the figure (PDF, PNG, ... by its extension).
    """
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))

    ax2 = ax1.twiny()  # a second x-axis sharing the y-axis
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: only aligns the ticks
    ax2.set_xlabel("Tokens seen")

    fig.tight_layout()
    if save_path is not None:
        fig.savefig(save_path)
    if show:
        plt.show()
    else:
        plt.close(fig)
    return fig


#####################################
# Chapter 5: loading OpenAI's weights
#####################################

def assign(left, right):
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {tuple(left.shape)}, Right: {tuple(right.shape)}")
    return nn.Parameter(torch.as_tensor(right, dtype=left.dtype).clone().detach())


def _assign_named(name, left, right):
    try:
        return assign(left, right)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def load_weights_into_gpt(gpt, params):
    """Copy the parameter dict of gpt_download.load_gpt2_params_from_tf_ckpt into `gpt`."""
    gpt.pos_emb.weight = _assign_named("wpe", gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = _assign_named("wte", gpt.tok_emb.weight, params["wte"])

    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(f"The checkpoint has {len(params['blocks'])} blocks, "
                         f"the model {len(gpt.trf_blocks)}: check the model size")
    for b, (block, p) in enumerate(zip(gpt.trf_blocks, params["blocks"], strict=True)):
        att, ff, name = block.att, block.ff, f"blocks[{b}]"
        # OpenAI stores query, key and value side by side: split along the last axis.
        q_w, k_w, v_w = _split3(p["attn"]["c_attn"]["w"], f"{name}.attn.c_attn.w")
        q_b, k_b, v_b = _split3(p["attn"]["c_attn"]["b"], f"{name}.attn.c_attn.b")
        # OpenAI's Conv1D weights are (in, out); nn.Linear's are (out, in): transpose.
        att.W_query.weight = _assign_named(f"{name}.attn.c_attn.w (query)", att.W_query.weight, q_w.T)
        att.W_key.weight = _assign_named(f"{name}.attn.c_attn.w (key)", att.W_key.weight, k_w.T)
        att.W_value.weight = _assign_named(f"{name}.attn.c_attn.w (value)", att.W_value.weight, v_w.T)
        att.W_query.bias = _assign_named(f"{name}.attn.c_attn.b (query)", att.W_query.bias, q_b)
        att.W_key.bias = _assign_named(f"{name}.attn.c_attn.b (key)", att.W_key.bias, k_b)
        att.W_value.bias = _assign_named(f"{name}.attn.c_attn.b (value)", att.W_value.bias, v_b)

        c_proj = p["attn"]["c_proj"]
        att.out_proj.weight = _assign_named(f"{name}.attn.c_proj.w", att.out_proj.weight, c_proj["w"].T)
        att.out_proj.bias = _assign_named(f"{name}.attn.c_proj.b", att.out_proj.bias, c_proj["b"])

        c_fc, mlp_proj = p["mlp"]["c_fc"], p["mlp"]["c_proj"]
        ff.layers[0].weight = _assign_named(f"{name}.mlp.c_fc.w", ff.layers[0].weight, c_fc["w"].T)
        ff.layers[0].bias = _assign_named(f"{name}.mlp.c_fc.b", ff.layers[0].bias, c_fc["b"])
        ff.layers[2].weight = _assign_named(f"{name}.mlp.c_proj.w", ff.layers[2].weight, mlp_proj["w"].T)
        ff.layers[2].bias = _assign_named(f"{name}.mlp.c_proj.b", ff.layers[2].bias, mlp_proj["b"])

        block.norm1.scale = _assign_named(f"{name}.ln_1.g", block.norm1.scale, p["ln_1"]["g"])
        block.norm1.shift = _assign_named(f"{name}.ln_1.b", block.norm1.shift, p["ln_1"]["b"])
        block.norm2.scale = _assign_named(f"{name}.ln_2.g", block.norm2.scale, p["ln_2"]["g"])
        block.norm2.shift = _assign_named(f"{name}.ln_2.b", block.norm2.shift, p["ln_2"]["b"])

    gpt.final_norm.scale = _assign_named("g", gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = _assign_named("b", gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = _assign_named("wte (output head)", gpt.out_head.weight, params["wte"])


def _split3(array, name):
    if array.shape[-1] % 3 != 0:
        raise ValueError(f"{name}: last axis {array.shape[-1]} does not split into q, k, v")
    return torch.as_tensor(array).chunk(3, dim=-1)


#####################################
# Appendix E: LoRA (exercise 7.4)
#####################################

class LoRALayer(nn.Module):
    """The low-rank update alpha * (x @ A @ B); B starts at zero, so it starts as a no-op."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))  # (in_dim, rank)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises weights
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # (rank, out_dim)
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    """Swap every nn.Linear in `model` (the output head too) for a LinearWithLoRA, in place.

    Freeze the model first (`requires_grad_(False)`), so only A and B are trained.
    """
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
