"""A whole decode step in one C call: native_decode.c, compiled on the reader's machine.

At batch 1 the split products of parallel_matvec.py read the weights near the memory's
speed, but the rest of a step, about 40 small torch calls a layer, costs milliseconds: on the
project's 2-core machine 3-5 ms of a gpt2-small token's 22. native_decode.c runs the whole
step (every block, the final norm and the head) in one OpenMP region, so that a token costs
about its bytes over the bandwidth. It is the third path the decode calibration can pick
(parallel_matvec.MatvecChooser: "native"), for what it covers:

- a GPT model in the book's layout (previous_chapters.GPTModel: LayerNorm, nn.Linear layers,
  GELU; `GPTDecoder`) or a Llama 3 / SmolLM2 / Qwen3 model of llama3.py and qwen3.py
  (RMSNorm, RoPE, grouped-query attention, QK-norm, SwiGLU; `LlamaDecoder`); float32, on the
  CPU, no dropout to apply, batch 1 without padding. A LoRA model, a bfloat16 decode, a batch
  or any module it does not know (`layout_problem`) use the other paths;
- a machine with a C compiler (`$CC`, else Python's own, else cc, gcc or clang). The library
  is built once, about a second, into INSTRUCTKIT_NATIVE_DIR (default: the user's cache
  folder, ~/.cache/instructkit), named by a hash of the source, the compiler and the machine,
  and written atomically; without a compiler (as on most Windows machines) the path is simply
  not offered, and `unavailable_reason()` says why.

The C code shares torch's OpenMP runtime (libgomp has one soname, so torch's copy serves
both) and uses torch's thread count. The dot products add in another order than the
library's, so logits agree to float32 rounding and greedy tokens match the plain path's
(tests/test_native_decode.py).
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from instructkit.errors import BadInputError

SOURCE = Path(__file__).with_name("native_decode.c")
DIR_ENV_VAR = "INSTRUCTKIT_NATIVE_DIR"
# Tried in order: the first that compiles is kept (no OpenMP, e.g. Apple's clang: one thread).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])

_library = None  # the loaded ctypes.CDLL, once built
_failure = None  # why it could not be built, once tried


#####################################
# Building and loading the library
#####################################

def native_dir(environ=os.environ):
    """Where the compiled library is kept."""
    if environ.get(DIR_ENV_VAR):
        return Path(environ[DIR_ENV_VAR])
    base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "instructkit"


def find_compiler(environ=os.environ):
    """The C compiler's command (a list), or None."""
    configured = environ.get("CC") or sysconfig.get_config_var("CC")
    candidates = [shlex.split(configured)] if configured else []
    candidates += [["cc"], ["gcc"], ["clang"]]
    for command in candidates:
        if command and shutil.which(command[0]):
            return command
    return None


def _build_key(source, compiler, flags):
    """What a compiled library depends on, hashed: the source, the compiler and its flags, the
    machine (-march=native)."""
    what = (source, compiler, flags, platform.machine(), platform.node(), sys.platform)
    return hashlib.sha256(repr(what).encode()).hexdigest()[:16]


def build(compiler, folder):
    """Compile SOURCE into `folder` (if not there yet); returns the library's path.

    Raises RuntimeError with the compiler's last message when no flag set compiles."""
    source = SOURCE.read_bytes()
    targets = [folder / f"native_decode-{_build_key(source, compiler, flags)}.so" for flags in FLAG_SETS]
    # one built before, by the first flag set that compiled then: no compiler run at all
    built = next((target for target in targets if target.exists()), None)
    if built is not None:
        return built
    folder.mkdir(parents=True, exist_ok=True)
    message = "(no message)"
    for flags, target in zip(FLAG_SETS, targets, strict=True):
        # a private name first, then one atomic rename: a reader never loads half a file
        fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        command = [*compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", partial, "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8",
                                errors="replace")
        if result.returncode == 0:
            os.replace(partial, target)
            return target
        os.unlink(partial)
        message = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
    raise RuntimeError(f"{shlex.join(compiler)} could not compile {SOURCE.name}: {message}")


def load_library():
    """The compiled library (built on first use), or None when it cannot be built here."""
    global _library, _failure
    if _library is None and _failure is None:
        if sys.platform == "win32":
            _failure = "no native decode on Windows (it needs gcc or clang and OpenMP)"
        elif (compiler := find_compiler()) is None:
            _failure = "no C compiler found (set CC, or install gcc or clang)"
        else:
            try:
                _library = ctypes.CDLL(str(build(compiler, native_dir())))
            except (RuntimeError, OSError) as error:
                _failure = str(error)
        if _library is not None:
            _declare(_library)
    return _library


def unavailable_reason():
    """None when the library loads, else why not (one line)."""
    return None if load_library() is not None else _failure


def reset():
    """Forget the loaded library and any failure (tests)."""
    global _library, _failure
    _library = _failure = None


#####################################
# The models' layouts, as the C code reads them
#####################################

class GPTLayerC(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_void_p) for name in (
        "norm1_scale", "norm1_shift", "w_query", "b_query", "w_key", "b_key", "w_value", "b_value",
        "w_out", "b_out", "norm2_scale", "norm2_shift", "w_fc1", "b_fc1", "w_fc2", "b_fc2",
        "keys", "values")),
                ("norm1_eps", ctypes.c_float), ("norm2_eps", ctypes.c_float)]


class GPTModelC(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int) for name in (
        "n_layers", "emb_dim", "n_heads", "head_dim", "hidden_dim", "vocab_size", "max_len",
        "n_threads")),
                ("layers", ctypes.POINTER(GPTLayerC)),
                *((name, ctypes.c_void_p) for name in ("final_scale", "final_shift", "w_head", "b_head")),
                ("final_eps", ctypes.c_float)]


class LlamaLayerC(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_void_p) for name in (
        "norm1_scale", "w_query", "w_key", "w_value", "q_norm", "k_norm", "w_out", "norm2_scale",
        "w_gate", "w_up", "w_down", "keys", "values")),
                *((name, ctypes.c_float) for name in ("norm1_eps", "norm2_eps", "qk_eps"))]


class LlamaModelC(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int) for name in (
        "n_layers", "emb_dim", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
        "max_len", "n_threads")),
                ("layers", ctypes.POINTER(LlamaLayerC)),
                *((name, ctypes.c_void_p) for name in ("final_scale", "w_head", "cos", "sin")),
                ("final_eps", ctypes.c_float), ("scaling", ctypes.c_float)]


def _declare(library):
    """The two step functions' signatures: (model struct, x, pos, logits, work) -> int."""
    for name, struct in (("gpt_decode_step", GPTModelC), ("llama_decode_step", LlamaModelC)):
        function = getattr(library, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.POINTER(struct), ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_void_p]


def _is_llama(model):
    """instructkit/llama3.py's and qwen3.py's layout: RoPE tables, grouped-query attention."""
    return hasattr(model, "cos") and hasattr(model.trf_blocks[0].att, "num_kv_groups")


# The modules each layout is made of, by class name (the book's repository's classes and
# previous_chapters.py's alike): any other module (a LoRA layer, a student's own) may compute
# something the C code does not, so the model then takes the other paths.
KNOWN_MODULES = {
    "gpt": {"TransformerBlock", "MultiHeadAttention", "FeedForward", "Sequential", "ModuleList",
            "Linear", "GELU", "LayerNorm", "Dropout", "Embedding"},
    "llama": {"TransformerBlock", "GroupedQueryAttention", "FeedForward", "ModuleList", "Linear",
              "RMSNorm", "Embedding"},
}


def layout_problem(model):
    """None when native_decode.c computes this model's forward, else why not.

    The book's GPT layout (LayerNorm, nn.Linear layers, Linear-GELU-Linear, dropouts that are
    the identity) or llama3.py's (RMSNorm, grouped-query attention with or without QK-norm,
    SwiGLU, no biases); plain nn.Linear layers, float32 on the CPU, and no hooks on the
    modules the C code stands in for (the embeddings are still called as modules)."""
    if not all(hasattr(model, name) for name in ("tok_emb", "trf_blocks", "final_norm", "out_head")):
        return "not a GPT, Llama or Qwen3 model of this project"
    family = "llama" if _is_llama(model) else "gpt" if hasattr(model, "pos_emb") else None
    if family is None:
        return "not a GPT, Llama or Qwen3 model of this project"
    embeddings = (model.tok_emb, getattr(model, "pos_emb", None))
    for module in list(model.modules())[1:]:
        name = type(module).__name__
        if name not in KNOWN_MODULES[family]:
            return f"a module the C step does not compute: {name}"
        if isinstance(module, nn.Dropout) and module.training and module.p > 0:
            return "the model is in training mode (dropout)"
        if isinstance(module, nn.Linear) and (type(module) is not nn.Linear
                                              or (family == "llama" and module.bias is not None)):
            return "a linear layer is not a plain nn.Linear"
        if (module._forward_hooks or module._forward_pre_hooks) and module not in embeddings:
            return f"a {name} has forward hooks, which the C step would skip"
    if family == "gpt" and any([type(m).__name__ for m in block.ff.layers] != ["Linear", "GELU", "Linear"]
                               for block in model.trf_blocks):
        return "the feed-forward is not Linear, GELU, Linear"
    if any(p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous()
           for p in [*model.parameters(), *model.buffers()]):
        return "the weights are not contiguous float32 tensors on the CPU"
    return None


def _pointer(tensor):
    return None if tensor is None else tensor.data_ptr()


#####################################
# The decode step
#####################################

class NativeDecoder:
    """`step(token, kv_cache)`: the logits (1, vocab_size) after one new token, through C.

    token: (1, 1) the newest token id; kv_cache: fast_gpt.KVCache of batch 1, whose
    `length` cached positions come before it (the C code writes this position's keys and
    values into it; `length` is advanced here). Build one with `decoder_for`; the
    subclasses fill `struct` (the C model) and say how a token is embedded.
    """

    function_name = None  # the C function
    scratch_size = None  # floats of scratch besides n_heads * max_len (set by the subclasses)

    def __init__(self, library, model):
        self.model = model
        self.function = getattr(library, self.function_name)
        self.vocab_size = model.out_head.out_features
        self._cache = None  # the KVCache whose tensors the struct points at

    def embed(self, token, pos):
        """The new token's input vector (emb_dim,), a fresh tensor the C code overwrites."""
        raise NotImplementedError

    def _attach(self, kv_cache):
        """Point the layers at kv_cache's tensors (once per cache) and size the scratch."""
        for layer, keys, values in zip(self.layers, kv_cache.keys, kv_cache.values, strict=True):
            if keys.shape[0] != 1 or not (keys.is_contiguous() and values.is_contiguous()):
                raise ValueError("the native decode step takes a contiguous KV cache of batch 1")
            layer.keys, layer.values = keys.data_ptr(), values.data_ptr()
        max_len = kv_cache.keys[0].shape[2]
        self.struct.max_len = max_len
        self.work = torch.empty(self.scratch_size + self.struct.n_heads * max_len)
        self._cache = kv_cache

    def step(self, token, kv_cache):
        if self._cache is not kv_cache:
            self._attach(kv_cache)
        pos = kv_cache.length
        if pos >= self.struct.max_len:
            raise ValueError(f"the KV cache holds {self.struct.max_len} positions, all used")
        self.struct.n_threads = torch.get_num_threads()
        x = self.embed(token, pos)
        logits = torch.empty(1, self.vocab_size)
        self.function(ctypes.byref(self.struct), x.data_ptr(), pos, logits.data_ptr(),
                      self.work.data_ptr())
        kv_cache.length += 1
        return logits


class GPTDecoder(NativeDecoder):
    """gpt_decode_step for the book's GPTModel."""

    function_name = "gpt_decode_step"

    def __init__(self, library, model):
        super().__init__(library, model)
        blocks = list(model.trf_blocks)
        emb_dim, att = model.tok_emb.weight.shape[1], blocks[0].att
        hidden_dim = blocks[0].ff.layers[0].out_features
        self.scratch_size = 5 * emb_dim + hidden_dim
        self.layers = (GPTLayerC * len(blocks))()
        for layer, block in zip(self.layers, blocks, strict=True):
            pairs = (("query", block.att.W_query), ("key", block.att.W_key), ("value", block.att.W_value),
                     ("out", block.att.out_proj), ("fc1", block.ff.layers[0]), ("fc2", block.ff.layers[2]))
            for name, linear in pairs:
                setattr(layer, f"w_{name}", _pointer(linear.weight))
                setattr(layer, f"b_{name}", _pointer(linear.bias))
            for i, norm in ((1, block.norm1), (2, block.norm2)):
                setattr(layer, f"norm{i}_scale", _pointer(norm.scale))
                setattr(layer, f"norm{i}_shift", _pointer(norm.shift))
                setattr(layer, f"norm{i}_eps", norm.eps)
        norm = model.final_norm
        self.struct = GPTModelC(
            n_layers=len(blocks), emb_dim=emb_dim, n_heads=att.num_heads, head_dim=att.head_dim,
            hidden_dim=hidden_dim, vocab_size=self.vocab_size, layers=self.layers,
            final_scale=_pointer(norm.scale), final_shift=_pointer(norm.shift),
            w_head=_pointer(model.out_head.weight), b_head=_pointer(model.out_head.bias),
            final_eps=norm.eps)

    def embed(self, token, pos):
        # the modules themselves, as fast_gpt calls them (their hooks run)
        positions = torch.tensor([pos], device=token.device)
        return (self.model.tok_emb(token) + self.model.pos_emb(positions)).view(-1)


class LlamaDecoder(NativeDecoder):
    """llama_decode_step for llama3.py's Llama3Model and qwen3.py's Qwen3Model."""

    function_name = "llama_decode_step"

    def __init__(self, library, model):
        super().__init__(library, model)
        blocks = list(model.trf_blocks)
        att = blocks[0].att
        emb_dim, hidden_dim = model.tok_emb.weight.shape[1], blocks[0].ff.fc1.out_features
        self.scratch_size = emb_dim + 2 * (att.num_heads + att.num_kv_groups) * att.head_dim + hidden_dim
        self.layers = (LlamaLayerC * len(blocks))()
        for layer, block in zip(self.layers, blocks, strict=True):
            a, ff = block.att, block.ff
            pairs = (("w_query", a.W_query), ("w_key", a.W_key), ("w_value", a.W_value),
                     ("w_out", a.out_proj), ("w_gate", ff.fc1), ("w_up", ff.fc2), ("w_down", ff.fc3))
            for name, linear in pairs:
                setattr(layer, name, _pointer(linear.weight))
            layer.norm1_scale, layer.norm1_eps = _pointer(block.norm1.scale), block.norm1.eps
            layer.norm2_scale, layer.norm2_eps = _pointer(block.norm2.scale), block.norm2.eps
            if a.q_norm is not None:
                layer.q_norm, layer.k_norm = _pointer(a.q_norm.scale), _pointer(a.k_norm.scale)
                layer.qk_eps = a.q_norm.eps
        self.struct = LlamaModelC(
            n_layers=len(blocks), emb_dim=emb_dim, n_heads=att.num_heads,
            n_kv_heads=att.num_kv_groups, head_dim=att.head_dim, hidden_dim=hidden_dim,
            vocab_size=self.vocab_size, layers=self.layers,
            final_scale=_pointer(model.final_norm.scale), w_head=_pointer(model.out_head.weight),
            cos=_pointer(model.cos), sin=_pointer(model.sin), final_eps=model.final_norm.eps,
            scaling=att.scaling)

    def embed(self, token, pos):
        return self.model.tok_emb(token).view(-1)  # a new tensor, which the C code overwrites


def require():
    """The library, or BadInputError (one line) where the user asked for the native path and
    this machine cannot build it."""
    library = load_library()
    if library is None:
        raise BadInputError(f"--decode-matvec native: {_failure}; use auto, parallel or plain")
    return library


def decoder_for(model, batch_size, pad_mask=None, decode_dtype=None, forced=False):
    """A NativeDecoder (GPTDecoder or LlamaDecoder) for this generation's batch-1 decode steps,
    or None where it does not apply.

    forced: the user asked for the native path (--decode-matvec native): where it applies, a
    machine that cannot build it is then an error (`require`) instead of a silent fallback.
    """
    if batch_size != 1 or pad_mask is not None or decode_dtype is not None:
        return None
    if layout_problem(model) is not None:
        return None
    library = require() if forced else load_library()
    if library is None:
        return None
    return (LlamaDecoder if _is_llama(model) else GPTDecoder)(library, model)
