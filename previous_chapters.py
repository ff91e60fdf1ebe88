"""Everything from chapters 2 to 6 that chapter 7 builds on, as the book's own code.

The data loader of chapter 2, the multi-head attention of chapter 3, the GPT model of
chapter 4, and from chapter 5 text generation, the loss, the training loop, the loss plot
and the loading of OpenAI's GPT-2 weights. The code is Sebastian Raschka's (Apache License
2.0), from rasbt/LLMs-from-scratch, ch07/01_main-chapter-code/previous_chapters.py: the same
definitions in the same order, with the same names, signatures, state-dict keys and
arithmetic, so checkpoints and notebooks move freely between the book's code and this file.
The comments are ours.

The project's few changes are marked `# Not in the book:` where they sit:
- `generate` with `eos_id` stops every row of a batch on its own (the book's stop works for
  a batch of one), its top-k filter keeps each row's own k-th largest logit, and on Apple's
  GPU it draws sampled tokens on the CPU;
- `train_model_simple` skips the per-epoch sample when `start_context` is None;
- `generate_and_print_sample` prints "?" for a character the console cannot encode (a
  Windows code page, output redirected) instead of ending the training
  (instructkit/console.py);
- `load_weights_into_gpt` first checks that the checkpoint fits the model
  (instructkit/gpt2_params.py) and names the checkpoint's parameter when it does not;
- `plot_losses` takes where to save (`save_path`, the book's "loss-plot.pdf" by default)
  and whether to show the figure (`show`), and returns the figure.

The speed-ups (KV cache, fused kernels, batched generation, the packed training loss) run
on this model from fast_gpt.py, which tests prove equal to this file's plain path.
"""


import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import tiktoken
import torch
import torch.nn as nn
from torch.utils.data import Dataset, DataLoader


#####################################
# Chapter 2: input and target windows
#####################################


class GPTDatasetV1(Dataset):
    def __init__(self, txt, tokenizer, max_length, stride):
        self.tokenizer = tokenizer
        self.input_ids = []
        self.target_ids = []

        # Token ids of the whole text, the end-of-text marker allowed
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})

        # Windows of max_length tokens, starting every `stride` tokens (overlapping when
        # stride < max_length); each target window is its input shifted one token ahead
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i:i + max_length]
            target_chunk = token_ids[i + 1: i + max_length + 1]
            self.input_ids.append(torch.tensor(input_chunk))
            self.target_ids.append(torch.tensor(target_chunk))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt, batch_size=4, max_length=256,
                         stride=128, shuffle=True, drop_last=True, num_workers=0):
    # GPT-2's byte-pair encoding
    tokenizer = tiktoken.get_encoding("gpt2")

    # The text cut into (input, target) windows
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)

    # Batches of windows
    dataloader = DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)

    return dataloader


#####################################
# Chapter 3: multi-head attention
#####################################
class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by n_heads"

        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads  # each head gets an equal slice of d_out

        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # mixes the heads' outputs into one vector
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape

        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)

        # The heads come from reshaping alone: a new num_heads axis splits d_out,
        # (b, num_tokens, d_out) -> (b, num_tokens, num_heads, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim)

        # Heads before tokens: (b, num_heads, num_tokens, head_dim)
        keys = keys.transpose(1, 2)
        queries = queries.transpose(1, 2)
        values = values.transpose(1, 2)

        # Scaled dot-product self-attention, causally masked
        attn_scores = queries @ keys.transpose(2, 3)  # every head's query-key dot products

        # The stored mask, cut to this sequence's length, as True/False
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]

        # Scores of future tokens become -inf (zero weight after the softmax)
        attn_scores.masked_fill_(mask_bool, -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1]**0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        # (b, num_tokens, num_heads, head_dim)
        context_vec = (attn_weights @ values).transpose(1, 2)

        # The heads side by side again: num_heads * head_dim = d_out
        context_vec = context_vec.reshape(b, num_tokens, self.d_out)
        context_vec = self.out_proj(context_vec)  # a final linear layer (optional in general)

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
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        # Attention, with a residual (shortcut) connection around it
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)   # (batch_size, num_tokens, emb_size)
        x = self.drop_resid(x)
        x = x + shortcut  # the block's input added back

        # The feed-forward network, with its own residual connection
        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_resid(x)
        x = x + shortcut  # the block's input added back

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
    # idx: (batch, n_tokens) token ids of the text so far
    for _ in range(max_new_tokens):

        # Keep at most the last context_size tokens: a model that attends over
        # 5 positions sees only the newest 5 of a 10-token text
        idx_cond = idx[:, -context_size:]

        # The model's next-token scores
        with torch.no_grad():
            logits = model(idx_cond)

        # Only the last position predicts the next token:
        # (batch, n_tokens, vocab_size) -> (batch, vocab_size)
        logits = logits[:, -1, :]

        # Greedy choice: the token with the largest logit
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (batch, 1)

        # Append it to the text so far
        idx = torch.cat((idx, idx_next), dim=1)  # (batch, n_tokens+1)

    return idx


#####################################
# Chapter 5: generation, training, loading weights
#####################################
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    # Not in the book: with eos_id, every row of a batch stops on its own (the book's
    # `if idx_next == eos_id: break` only works for a batch of one row). A row that has
    # produced eos_id is padded with eos_id while the others go on; generation ends once
    # every row has produced it, before eos_id is appended, as the book's loop ends.
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)

    # As in generate_text_simple: the model's scores at the last position
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]

        # New: top-k sampling, only the k largest logits stay candidates
        if top_k is not None:
            # The k largest logits of each row, in decreasing order
            top_logits, _ = torch.topk(logits, top_k)
            # Not in the book: [:, -1:] keeps each row's own k-th largest logit; the book's
            # [:, -1] would compare every row with all rows' k-th logits on a batch
            min_val = top_logits[:, -1:]
            logits = torch.where(logits < min_val, torch.tensor(float("-inf")).to(logits.device), logits)

        # New: temperature, to flatten (> 1) or sharpen (< 1) the distribution
        if temperature > 0.0:
            logits = logits / temperature

            # Subtracting each row's largest logit leaves the softmax unchanged and keeps
            # exp() from overflowing, so every device (MPS too) gives the same result
            logits = logits - logits.max(dim=-1, keepdim=True).values

            # Probabilities over the vocabulary
            probs = torch.softmax(logits, dim=-1)  # (batch_size, vocab_size)

            # Draw the next token from them
            # Not in the book: on Apple's GPU the draw runs on the CPU, because MPS's multinomial
            # can return tokens of probability zero (outside the top k)
            if probs.device.type == "mps":
                idx_next = torch.multinomial(probs.cpu(), num_samples=1).to(probs.device)
            else:
                idx_next = torch.multinomial(probs, num_samples=1)  # (batch_size, 1)

        # Without temperature, greedy decoding as before: the largest logit
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (batch_size, 1)

        if eos_id is not None:  # Not in the book: the per-row stop described above
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished = finished | (idx_next[:, 0] == eos_id)
            if finished.all():  # every row has produced eos_id: stop early
                break

        # As before: append the new token to the text so far
        idx = torch.cat((idx, idx_next), dim=1)  # (batch_size, num_tokens+1)

    return idx


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    # What the loop records: the losses at each evaluation and the tokens seen by then
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1

    # One pass over the training data per epoch
    for epoch in range(num_epochs):
        model.train()  # dropout on (training mode)

        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # clear the previous step's gradients
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()  # gradients of the loss
            optimizer.step()  # move the weights along them
            tokens_seen += input_batch.numel()
            global_step += 1

            # Every eval_freq steps: both losses, recorded and printed
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        # At the end of each epoch, a generated sample shows the progress
        if start_context is not None:  # Not in the book: start_context=None prints no sample
            generate_and_print_sample(
                model, tokenizer, device, start_context
            )

    return train_losses, val_losses, track_tokens_seen


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
        # Not in the book: print_text prints "?" for a character the console cannot show (a
        # Windows code page with output redirected) instead of ending the training
        from instructkit.console import print_text

        print_text(decoded_text.replace("\n", " "))  # all on one line
    model.train()


def assign(left, right):
    if left.shape != right.shape:
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    return torch.nn.Parameter(torch.tensor(right))


def load_weights_into_gpt(gpt, params):
    # Not in the book: a checkpoint that does not fit the model (another depth or width,
    # a missing parameter) is refused before anything is copied, naming the checkpoint's
    # parameter; the book's loop would stop halfway, or leave a deeper model's last
    # blocks random without a word.
    from instructkit.gpt2_params import check_params_fit  # Not in the book: see above
    check_params_fit(gpt, params)  # Not in the book: see above

    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])

    for b in range(len(params["blocks"])):
        # OpenAI keeps query, key and value in one array; split it into three, and
        # transpose OpenAI's (in, out) weights into torch's (out, in)
        q_w, k_w, v_w = np.split(
            (params["blocks"][b]["attn"]["c_attn"])["w"], 3, axis=-1)
        gpt.trf_blocks[b].att.W_query.weight = assign(
            gpt.trf_blocks[b].att.W_query.weight, q_w.T)
        gpt.trf_blocks[b].att.W_key.weight = assign(
            gpt.trf_blocks[b].att.W_key.weight, k_w.T)
        gpt.trf_blocks[b].att.W_value.weight = assign(
            gpt.trf_blocks[b].att.W_value.weight, v_w.T)

        q_b, k_b, v_b = np.split(
            (params["blocks"][b]["attn"]["c_attn"])["b"], 3, axis=-1)
        gpt.trf_blocks[b].att.W_query.bias = assign(
            gpt.trf_blocks[b].att.W_query.bias, q_b)
        gpt.trf_blocks[b].att.W_key.bias = assign(
            gpt.trf_blocks[b].att.W_key.bias, k_b)
        gpt.trf_blocks[b].att.W_value.bias = assign(
            gpt.trf_blocks[b].att.W_value.bias, v_b)

        gpt.trf_blocks[b].att.out_proj.weight = assign(
            gpt.trf_blocks[b].att.out_proj.weight,
            params["blocks"][b]["attn"]["c_proj"]["w"].T)
        gpt.trf_blocks[b].att.out_proj.bias = assign(
            gpt.trf_blocks[b].att.out_proj.bias,
            params["blocks"][b]["attn"]["c_proj"]["b"])

        gpt.trf_blocks[b].ff.layers[0].weight = assign(
            gpt.trf_blocks[b].ff.layers[0].weight,
            params["blocks"][b]["mlp"]["c_fc"]["w"].T)
        gpt.trf_blocks[b].ff.layers[0].bias = assign(
            gpt.trf_blocks[b].ff.layers[0].bias,
            params["blocks"][b]["mlp"]["c_fc"]["b"])
        gpt.trf_blocks[b].ff.layers[2].weight = assign(
            gpt.trf_blocks[b].ff.layers[2].weight,
            params["blocks"][b]["mlp"]["c_proj"]["w"].T)
        gpt.trf_blocks[b].ff.layers[2].bias = assign(
            gpt.trf_blocks[b].ff.layers[2].bias,
            params["blocks"][b]["mlp"]["c_proj"]["b"])

        gpt.trf_blocks[b].norm1.scale = assign(
            gpt.trf_blocks[b].norm1.scale,
            params["blocks"][b]["ln_1"]["g"])
        gpt.trf_blocks[b].norm1.shift = assign(
            gpt.trf_blocks[b].norm1.shift,
            params["blocks"][b]["ln_1"]["b"])
        gpt.trf_blocks[b].norm2.scale = assign(
            gpt.trf_blocks[b].norm2.scale,
            params["blocks"][b]["ln_2"]["g"])
        gpt.trf_blocks[b].norm2.shift = assign(
            gpt.trf_blocks[b].norm2.shift,
            params["blocks"][b]["ln_2"]["b"])

    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    # GPT-2 ties the output head to the token embedding: the same weights twice
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])


def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    encoded_tensor = torch.tensor(encoded).unsqueeze(0)  # a batch of one: (1, n_tokens)
    return encoded_tensor


def token_ids_to_text(token_ids, tokenizer):
    flat = token_ids.squeeze(0)  # (1, n_tokens) -> (n_tokens,)
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
        # Asking for more batches than the loader holds means all of them
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, save_path="loss-plot.pdf", show=True):
    # Not in the book: `save_path` (the book's file name by default; None saves nothing),
    # `show=False` closes the figure instead of showing it, and the figure is returned;
    # instructkit.run_record draws the plot of a finished run and saves it elsewhere.
    fig, ax1 = plt.subplots(figsize=(5, 3))

    # Both losses against the epochs
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs as tick labels

    # The tokens seen, on a second x-axis along the top
    ax2 = ax1.twiny()  # shares the y-axis with ax1
    ax2.plot(tokens_seen, train_losses, alpha=0)  # drawn invisibly, only to place the ticks
    ax2.set_xlabel("Tokens seen")

    fig.tight_layout()  # leave room for both axes' labels
    if save_path is not None:  # Not in the book: see above
        plt.savefig(save_path)
    if show:  # Not in the book: see above
        plt.show()
    else:
        plt.close(fig)
    return fig  # Not in the book: see above
