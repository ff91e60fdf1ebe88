"""The four GPT-2 sizes: one table for the model configs, the command line and the downloads.

The sizes differ only in width and depth; everything else is the base config below, shared
by all four (chapter 5, section 5.5). A model can be named three ways: the book's name
'gpt2-medium (355M)', the short name 'gpt2-medium', or OpenAI's folder name '355M'.
"""

BASE_CONFIG = {
    "vocab_size": 50257,     # vocabulary size of the GPT-2 tokenizer
    "context_length": 1024,  # longest input the model attends over
    "drop_rate": 0.0,        # dropout (off for finetuning, as in the book)
    "qkv_bias": True,        # GPT-2 has biases in the query/key/value projections
}

# short name: (the book's name, OpenAI's folder name, emb_dim, n_layers, n_heads)
GPT2_SIZES = {
    "gpt2-small": ("gpt2-small (124M)", "124M", 768, 12, 12),
    "gpt2-medium": ("gpt2-medium (355M)", "355M", 1024, 24, 16),
    "gpt2-large": ("gpt2-large (774M)", "774M", 1280, 36, 20),
    "gpt2-xl": ("gpt2-xl (1558M)", "1558M", 1600, 48, 25),
}

# A tiny random GPT for test and smoke modes: the whole pipeline in seconds, nothing downloaded.
TEST_MODE_CONFIG = {
    "vocab_size": 50257, "context_length": 256, "emb_dim": 64,
    "n_heads": 4, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True,
}


def short_model_name(model):
    """'gpt2-medium', 'gpt2-medium (355M)' or '355M' -> 'gpt2-medium'; ValueError otherwise."""
    for short, (book_name, folder, *_) in GPT2_SIZES.items():
        if model in (short, book_name, folder):
            return short
    raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(GPT2_SIZES)} "
                     f"(or the book's names, e.g. 'gpt2-medium (355M)', or '124M' ... '1558M')")


def book_model_name(model):
    """Any of the three names -> the book's name, e.g. 'gpt2-medium (355M)'."""
    return GPT2_SIZES[short_model_name(model)][0]


def model_folder(model):
    """Any of the three names -> OpenAI's folder name, e.g. '355M'."""
    return GPT2_SIZES[short_model_name(model)][1]


def gpt2_config(model):
    """The full GPTModel config dict for any of the three names of a GPT-2 size."""
    _, _, emb_dim, n_layers, n_heads = GPT2_SIZES[short_model_name(model)]
    return {**BASE_CONFIG, "emb_dim": emb_dim, "n_layers": n_layers, "n_heads": n_heads}
