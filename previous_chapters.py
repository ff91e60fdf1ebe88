"""The code of chapters 2 to 6 and appendix E that chapter 7 builds on, as the book writes it.

The GPT model (chapters 3 and 4), text generation (chapters 4 and 5), the loss and the
training loop (chapter 5), loading OpenAI's GPT-2 weights (chapter 5) and LoRA (appendix E,
exercise 7.4). Classes, functions, signatures, state-dict keys and arithmetic are the book's,
so checkpoints move freely between the book's code and this file. `# New:` marks what the
book's listings mark so; `# Not in the book:` marks the project's few fixes (generate with
`eos_id` on a batch, a stable softmax, plot_losses saving to a file, clear errors when
loading weights).

The speed-ups (KV cache, fused kernels, batched generation, the packed training loss) run on
this model from fast_gpt.py, which is proven equal to this file's plain path by tests.
"""

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from matplotlib.ticker import MaxNLocator

#####################################
# Chapter 3: multi-head attention
#####################################

class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"

        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads  # reduce the projection dim to match the output dim

        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # combines the heads' outputs
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape

        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)

        # Split the last dimension into heads: (b, num_tokens, num_heads, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim)

        # (b, num_tokens, num_heads, head_dim) -> (b, num_heads, num_tokens, head_dim)
        keys = keys.transpose(1, 2)
        queries = queries.transpose(1, 2)
        values = values.transpose(1, 2)

        # Scaled dot-product attention with a causal mask
        attn_scores = queries @ keys.transpose(2, 3)  # dot product for each head

        # The mask cut to the number of tokens, as booleans
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]

        # Future positions get -inf, so softmax gives them zero weight
        attn_scores.masked_fill_(mask_bool, -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1]**0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        # (b, num_tokens, num_heads, head_dim)
        context_vec = (attn_weights @ values).transpose(1, 2)

        # Combine the heads: self.d_out = self.num_heads * self.head_dim
        context_vec = context_vec.reshape(b, num_tokens, self.d_out)
        context_vec = self.out_proj(context_vec)  # optional projection

        return context_vec


#####################################
# Chapter 4: the GPT model
#####################################

class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(
            torch.sqrt(torch.tensor(2.0 / torch.pi)) *
            (x + 0.044715 * torch.pow(x, 3))
        ))


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
            qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        # Shortcut connection for the attention block
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)  # (batch_size, num_tokens, emb_size)
        x = self.drop_shortcut(x)
        x = x + shortcut  # add the original input back

        # Shortcut connection for the feed-forward block
        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        x = x + shortcut  # add the original input back

        return x


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])

        self.trf_blocks = nn.Sequential(
            *[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])

        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds  # (batch_size, num_tokens, emb_size)
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        logits = self.out_head(x)
        return logits


def generate_text_simple(model, idx, max_new_tokens, context_size):
    # idx is a (batch, n_tokens) array of indices in the current context
    for _ in range(max_new_tokens):

        # Crop the context to the supported context size
        idx_cond = idx[:, -context_size:]

        with torch.no_grad():
            logits = model(idx_cond)

        # Only the last time step: (batch, n_tokens, vocab_size) -> (batch, vocab_size)
        logits = logits[:, -1, :]

        # The index of the vocabulary entry with the highest logit
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (batch, 1)

        # Append it to the running sequence
        idx = torch.cat((idx, idx_next), dim=1)  # (batch, n_tokens+1)

    return idx


#####################################
# Chapter 5: generation, loss, training
#####################################

def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    # Not in the book: with eos_id, each row of a batch stops on its own (the book's
    # `if idx_next == eos_id: break` works for one row only). A finished row is padded with
    # eos_id while the others go on; generation ends once every row has produced it.
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)

    # For-loop is the same as before: get logits, and only focus on the last time step
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]

        # Not in the book: the top-k filter and temperature sampling as one function,
        # sample_next_token, which fast_gpt's generation reuses.
        idx_next = sample_next_token(logits, temperature, top_k)  # (batch, 1)

        if eos_id is not None:  # Not in the book: per-row stop (see above)
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished = finished | (idx_next[:, 0] == eos_id)
            if finished.all():  # stop generating once every row has produced eos_id
                break

        # Same as before: append the sampled index to the running sequence
        idx = torch.cat((idx, idx_next), dim=1)  # (batch, num_tokens+1)

    return idx


def sample_next_token(logits, temperature=0.0, top_k=None):
    """The next token (batch, 1) from the last position's logits (batch, vocab_size)."""
    # New: filter logits with top_k sampling
    if top_k is not None:
        # Keep only top_k values
        top_logits, _ = torch.topk(logits, top_k)
        # Not in the book: [:, -1:] keeps each row's own k-th value on a batch
        min_val = top_logits[:, -1:]
        logits = torch.where(logits < min_val, torch.tensor(float("-inf")).to(logits.device), logits)

    # New: apply temperature scaling
    if temperature > 0.0:
        logits = logits / temperature

        # Not in the book: subtract each row's largest logit first (a stable softmax, the
        # same probabilities)
        logits = logits - logits.max(dim=-1, keepdim=True).values

        # Apply softmax to get probabilities
        probs = torch.softmax(logits, dim=-1)  # (batch_size, vocab_size)

        # Sample from the distribution
        idx_next = torch.multinomial(probs, num_samples=1)  # (batch_size, 1)

    # Otherwise same as before: the index of the vocab entry with the highest logit
    else:
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (batch_size, 1)

    return idx_next


def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    encoded_tensor = torch.tensor(encoded).unsqueeze(0)  # add batch dimension
    return encoded_tensor


def token_ids_to_text(token_ids, tokenizer):
    flat = token_ids.squeeze(0)  # remove batch dimension
    return tokenizer.decode(flat.tolist())


def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
    return loss


def calc_loss_loader(data_loader, model, device, num_batches=None):
    total_loss = 0.
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        # Reduce the number of batches to match the total number of batches in the data loader
        # if num_batches exceeds the number of batches in the data loader
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context):
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(
            model=model, idx=encoded,
            max_new_tokens=50, context_size=context_size
        )
    decoded_text = token_ids_to_text(token_ids, tokenizer)
    print(decoded_text.replace("\n", " "))  # compact print format
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    # Initialize lists to track losses and tokens seen
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1

    # Main training loop
    for epoch in range(num_epochs):
        model.train()  # set model to training mode

        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # reset loss gradients from the previous batch iteration
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()  # calculate loss gradients
            optimizer.step()  # update model weights using loss gradients
            tokens_seen += input_batch.numel()
            global_step += 1

            # Optional evaluation step
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        # Print a sample text after each epoch
        if start_context is not None:  # Not in the book: start_context=None skips it
            generate_and_print_sample(
                model, tokenizer, device, start_context
            )

    return train_losses, val_losses, track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, save_path=None, show=True):
    # Not in the book: `save_path` writes the figure (PDF, PNG, ... by its extension), and
    # `show=False` closes it instead of showing it; the figure is returned.
    fig, ax1 = plt.subplots(figsize=(5, 3))

    # Plot training and validation loss against epochs
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # only integer labels on the x-axis

    # Create a second x-axis for tokens seen
    ax2 = ax1.twiny()  # a second x-axis that shares the same y-axis
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible plot for aligning ticks
    ax2.set_xlabel("Tokens seen")

    fig.tight_layout()  # adjust layout to make room
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
    # Not in the book: the model's dtype, and a copy (never a view of the NumPy array)
    return nn.Parameter(torch.as_tensor(right, dtype=left.dtype).clone().detach())


def load_weights_into_gpt(gpt, params):
    # Not in the book: a checkpoint of another depth is refused, and every shape mismatch
    # names the checkpoint's parameter (`_assign_named` and `_split3`, below).
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(f"The checkpoint has {len(params['blocks'])} blocks, "
                         f"the model {len(gpt.trf_blocks)}: check the model size")

    gpt.pos_emb.weight = _assign_named("wpe", gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = _assign_named("wte", gpt.tok_emb.weight, params["wte"])

    for b in range(len(params["blocks"])):
        blk, name = params["blocks"][b], f"blocks[{b}]"
        q_w, k_w, v_w = _split3(blk["attn"]["c_attn"]["w"], f"{name}.attn.c_attn.w")
        gpt.trf_blocks[b].att.W_query.weight = _assign_named(
            f"{name}.attn.c_attn.w (query)", gpt.trf_blocks[b].att.W_query.weight, q_w.T)
        gpt.trf_blocks[b].att.W_key.weight = _assign_named(
            f"{name}.attn.c_attn.w (key)", gpt.trf_blocks[b].att.W_key.weight, k_w.T)
        gpt.trf_blocks[b].att.W_value.weight = _assign_named(
            f"{name}.attn.c_attn.w (value)", gpt.trf_blocks[b].att.W_value.weight, v_w.T)

        q_b, k_b, v_b = _split3(blk["attn"]["c_attn"]["b"], f"{name}.attn.c_attn.b")
        gpt.trf_blocks[b].att.W_query.bias = _assign_named(
            f"{name}.attn.c_attn.b (query)", gpt.trf_blocks[b].att.W_query.bias, q_b)
        gpt.trf_blocks[b].att.W_key.bias = _assign_named(
            f"{name}.attn.c_attn.b (key)", gpt.trf_blocks[b].att.W_key.bias, k_b)
        gpt.trf_blocks[b].att.W_value.bias = _assign_named(
            f"{name}.attn.c_attn.b (value)", gpt.trf_blocks[b].att.W_value.bias, v_b)

        gpt.trf_blocks[b].att.out_proj.weight = _assign_named(
            f"{name}.attn.c_proj.w", gpt.trf_blocks[b].att.out_proj.weight,
            blk["attn"]["c_proj"]["w"].T)
        gpt.trf_blocks[b].att.out_proj.bias = _assign_named(
            f"{name}.attn.c_proj.b", gpt.trf_blocks[b].att.out_proj.bias,
            blk["attn"]["c_proj"]["b"])

        gpt.trf_blocks[b].ff.layers[0].weight = _assign_named(
            f"{name}.mlp.c_fc.w", gpt.trf_blocks[b].ff.layers[0].weight,
            blk["mlp"]["c_fc"]["w"].T)
        gpt.trf_blocks[b].ff.layers[0].bias = _assign_named(
            f"{name}.mlp.c_fc.b", gpt.trf_blocks[b].ff.layers[0].bias,
            blk["mlp"]["c_fc"]["b"])
        gpt.trf_blocks[b].ff.layers[2].weight = _assign_named(
            f"{name}.mlp.c_proj.w", gpt.trf_blocks[b].ff.layers[2].weight,
            blk["mlp"]["c_proj"]["w"].T)
        gpt.trf_blocks[b].ff.layers[2].bias = _assign_named(
            f"{name}.mlp.c_proj.b", gpt.trf_blocks[b].ff.layers[2].bias,
            blk["mlp"]["c_proj"]["b"])

        gpt.trf_blocks[b].norm1.scale = _assign_named(
            f"{name}.ln_1.g", gpt.trf_blocks[b].norm1.scale, blk["ln_1"]["g"])
        gpt.trf_blocks[b].norm1.shift = _assign_named(
            f"{name}.ln_1.b", gpt.trf_blocks[b].norm1.shift, blk["ln_1"]["b"])
        gpt.trf_blocks[b].norm2.scale = _assign_named(
            f"{name}.ln_2.g", gpt.trf_blocks[b].norm2.scale, blk["ln_2"]["g"])
        gpt.trf_blocks[b].norm2.shift = _assign_named(
            f"{name}.ln_2.b", gpt.trf_blocks[b].norm2.shift, blk["ln_2"]["b"])

    gpt.final_norm.scale = _assign_named("g", gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = _assign_named("b", gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = _assign_named("wte (output head)", gpt.out_head.weight, params["wte"])


def _assign_named(name, left, right):
    """Not in the book: `assign`, its shape-mismatch error naming the checkpoint's parameter."""
    try:
        return assign(left, right)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _split3(array, name):
    """Not in the book: the book's np.split(array, 3, axis=-1), with an error naming `name`."""
    if array.shape[-1] % 3 != 0:
        raise ValueError(f"{name}: last axis {array.shape[-1]} does not split into q, k, v")
    return torch.as_tensor(array).chunk(3, dim=-1)
