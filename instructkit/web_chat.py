"""A web chat for the finetuned model, with another model side by side (Gradio).

    pip install -r requirements-app.txt
    python -m instructkit.web_chat gpt2-medium355M-sft.pth --compare-pretrained  # vs. GPT-2 unfinetuned
    python -m instructkit.web_chat MODEL.pth --compare OTHER.pth --port 7861
    python -m instructkit.web_chat MODEL-adapters.pth      # a LoRA run's adapters on the pretrained GPT-2

or, inline in a notebook cell: `from instructkit.web_chat import launch; demo, url = launch("MODEL.pth")`.

Not in the book. The book's bonus app (Chainlit) hard-codes gpt2-medium, answers only once
the whole response is generated, and shows one model. Here, Gradio (it streams, renders
inline in Jupyter, and is what the Hugging Face hub uses):
- any GPT-2 size, read from the run record or the weights (model_files.py); LoRA adapters;
  a finetuned hub model (Qwen3, Llama 3.2, SmolLM2), rebuilt from the hub folder its run
  record names, with its own tokenizer and prompt style, as chat.py loads it;
- each answer streams token by token through the KV cache (fast_gpt.generate_stream, or
  fast_llm's for the hub models), and a
  Stop button ends it; each message is a new instruction in the model's prompt style (the
  chapter's Alpaca prompt or Phi-3), with an optional `### Input:`;
- a second column answers the same instruction with another model: the pretrained GPT-2 of
  the same size (or the pretrained hub model a Qwen3 or Llama run started from), or any
  other .pth (a DPO-tuned one, say), so a reader sees what finetuning did;
- settings: temperature, top-k, max new tokens, seed; greedy (temperature 0) is the default,
  and then an answer equals `generate`'s;
- an empty message or a text too long for the context gets a visible note; an exception
  while generating is shown in the chat (and logged) and the server keeps serving; a missing
  or mismatched model file is an error (exit code 2) before any server starts, and so is a
  --port out of range or in use (checked before any model loads).
It listens on 127.0.0.1 only, unless --host says otherwise.
"""

import argparse
import errno
import logging
import os
import socket
import sys

from instructkit.console import use_utf8_console
from instructkit.errors import BadInputError, ExpectedError
from instructkit.model_files import (
    ChatModel,
    ModelFileError,
    add_model_arguments,
    check_model_path,
    describe,
    load_chat_model,
)
from instructkit.parallel_matvec import add_decode_arguments, apply_decode_arguments
from instructkit.preflight import Limit, check_ranges

log = logging.getLogger("instructkit.web_chat")
EXIT_BAD_INPUT = 2
DEFAULT_MAX_NEW_TOKENS = 256
EMPTY_NOTE = "Note: the message was empty. Type an instruction, then press Enter or Send."


# Gradio's own search when no port is given: from GRADIO_SERVER_PORT (else 7860), 100 ports.
FIRST_PORT, PORTS_TRIED = int(os.environ.get("GRADIO_SERVER_PORT", "7860")), 100
# Ports in use: EADDRINUSE, and Windows' own number for it
ADDRESS_IN_USE = {errno.EADDRINUSE, 10048}


class PortError(BadInputError):
    """--host or --port where the server cannot listen: exit code 2, before any model loads.
    `in_use`: the port is taken (another may be free)."""

    def __init__(self, message, in_use=False):
        super().__init__(message)
        self.in_use = in_use


def check_port(host, port):
    """PortError unless a server can listen on `host`:`port` now (a socket binds there).

    `port` None: Gradio takes the first free one of its range, so one must be free.
    """
    if port is None:
        for candidate in range(FIRST_PORT, FIRST_PORT + PORTS_TRIED):
            try:
                return check_port(host, candidate)
            except PortError as e:
                if not e.in_use:
                    raise
        raise PortError(f"every port from {FIRST_PORT} to {FIRST_PORT + PORTS_TRIED - 1} is in "
                        f"use on {host}: pass a free one with --port")
    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise PortError(f"--host {host} is no address of this machine "
                        f"({getattr(e, 'strerror', None) or e}): use 127.0.0.1 (this machine "
                        f"only) or 0.0.0.0 (every network)") from None
    with socket.socket(family, kind, proto) as probe:
        if os.name != "nt":  # as the server will: a port just left (TIME_WAIT) is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            if e.errno in ADDRESS_IN_USE or getattr(e, "winerror", None) in ADDRESS_IN_USE:
                raise PortError(f"--port {port} is in use on {host} (another program, or "
                                f"another web chat, listens there): choose another --port, or "
                                f"leave --port out to take the first free one from "
                                f"{FIRST_PORT}", in_use=True) from None
            raise PortError(f"cannot listen on {host} port {port} ({e.strerror or e}): "
                            f"choose another --host or --port") from None
    return port


def check_arguments(args):
    """Every flag of the command line, before Gradio is imported or any model loads: the
    port's range, the model files (empty, a folder, missing), and a free host:port."""
    check_ranges(args, {"port": Limit(1, 65535)})
    check_model_paths(args.model, args.adapters, args.compare)
    check_port(args.host, args.port)


def check_model_paths(model_path, adapters=None, compare=None, compare_adapters=None):
    """ModelFileError for the first of the files that cannot be a model: before any loads."""
    check_model_path(model_path)
    for path, what in ((adapters, "adapter file"), (compare, "model file to compare with"),
                       (compare_adapters, "adapter file")):
        if path is not None:
            check_model_path(path, what)


def load_models(model_path, device="cpu", adapters=None, compare=None, compare_pretrained=False,
                compare_adapters=None, tokenizer_dir=None):
    """The ChatModels (and their info) to serve: the model, then the comparison if any."""
    from instructkit.gpt2_tokenizer import get_tokenizer
    from instructkit.model_files import load_pretrained_model, model_name_for

    check_model_paths(model_path, adapters, compare, compare_adapters)
    # without --tokenizer-dir: GPT-2's default, or a hub model's own (load_chat_model), as in
    # chat.py; the family comes from the run record (or the weights), never from a flag
    tokenizer = get_tokenizer(tokenizer_dir) if tokenizer_dir else None
    main, info = load_chat_model(model_path, device, adapters=adapters, tokenizer=tokenizer)
    models = [(main, info)]
    if compare is not None:
        models.append(load_chat_model(compare, device, adapters=compare_adapters,
                                      tokenizer=tokenizer))
        if models[1][1]["config_source"] == "inferred from the weights":
            models[1][0].style_name = main.style_name  # no record: ask it the same way
    elif compare_pretrained and "hub_folder" in info:  # the hub model before finetuning
        models.append(load_pretrained_hub_model(main, info, device))
    elif compare_pretrained:
        name = model_name_for(info["model_config"])
        if name is None:
            raise ModelFileError(f"{model_path} is no GPT-2 size, so there is no pretrained "
                                 f"GPT-2 to compare it with; use --compare OTHER.pth")
        model, pre_info = load_pretrained_model(name, device)
        pre_info["prompt_style"] = main.style_name
        models.append((ChatModel(model, main.tokenizer, main.style_name, pre_info["model"]),
                       pre_info))
    return models


def load_pretrained_hub_model(main, info, device="cpu"):
    """(ChatModel, info) of the pretrained hub model (Qwen3, Llama) that the finetuned `main`
    was trained from: its hub folder's weights, asked with `main`'s tokenizer and prompt style."""
    from instructkit import model_files

    model, _, pre_info = model_files.load_pretrained_hub_model(info["hub_folder"], info["model"],
                                                               main.style_name, device)
    return ChatModel(model, main.tokenizer, main.style_name, pre_info["model"]), pre_info


def shown_message(instruction, input_text):
    """The user's turn as the chat shows it."""
    return instruction + (f"\n\nInput: {input_text}" if input_text else "")


def answer_stream(chat, prompt, ids, settings):
    """Yield the answer so far; an exception becomes the message's text (and a log entry)."""
    max_new_tokens, temperature, top_k, seed = settings
    try:
        yield from chat.stream(prompt, ids, max_new_tokens, temperature, top_k, seed)
    except Exception as e:  # noqa: BLE001 - any failure is shown in the chat, the server goes on
        log.exception("Generation failed for %s", chat.label)
        yield f"⚠️ Generation failed: {type(e).__name__}: {e}"


def respond(chats, instruction, input_text, histories, settings):
    """One turn for every model: yields (histories, note) as the answers grow.

    The answers stream in turn, a token of each model at a time, so both columns grow
    together. Each message is answered on its own: earlier turns are not in the prompt,
    as in the chapter.
    """
    instruction, input_text = (instruction or "").strip(), (input_text or "").strip()
    if not instruction:
        yield histories, EMPTY_NOTE
        return
    max_new_tokens = settings[0]
    prepared = [chat.prepare(instruction, input_text, max_new_tokens) for chat in chats]
    notes = sorted({note for _, _, note in prepared if note})
    histories = [history + [{"role": "user", "content": shown_message(instruction, input_text)},
                            {"role": "assistant", "content": ""}] for history in histories]
    streams = [answer_stream(chat, prompt, ids, settings)
               for chat, (prompt, ids, _) in zip(chats, prepared, strict=True)]
    note = " ".join(notes)
    yield histories, note
    while streams:
        for i, stream in enumerate(streams):
            if stream is None:
                continue
            try:
                histories[i][-1]["content"] = next(stream)
            except StopIteration:
                streams[i] = None
        if all(s is None for s in streams):
            break
        yield histories, note
    yield histories, note


def build_app(models, title="Chat with your finetuned GPT"):
    """The Gradio Blocks for [(ChatModel, info), ...]: one chat column per model."""
    import gradio as gr

    chats = [chat for chat, _ in models]
    context = min(chat.context_size for chat in chats)
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\n" + "\n".join(f"- {describe(info)}" for _, info in models))
        with gr.Row():
            # Plain text, as the model wrote it (its answers are no Markdown).
            boxes = [gr.Chatbot(label=chat.label, elem_id=f"chat-{i}", height=360,
                                render_markdown=False) for i, chat in enumerate(chats)]
        instruction = gr.Textbox(label="Instruction", elem_id="instruction", lines=2,
                                 placeholder="e.g. Rewrite the sentence using a simile. "
                                             "(Enter sends, Shift+Enter for a new line)")
        input_text = gr.Textbox(label="Input (optional: fills ### Input:)", elem_id="input")
        note = gr.Markdown("", elem_id="note")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Settings (temperature 0 is greedy: the answer `generate` gives)",
                          open=False):
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                    elem_id="temperature")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0: all tokens)",
                              elem_id="top-k")
            max_new = gr.Slider(1, context, value=min(DEFAULT_MAX_NEW_TOKENS, context), step=1,
                                label="Max new tokens", elem_id="max-new-tokens")
            seed = gr.Number(value=123, precision=0, label="Seed (for sampling)", elem_id="seed")
        gr.Markdown("Each message is a new instruction: earlier turns are not sent to the model.")

        def turn(instruction_text, input_value, temperature_value, top_k_value, max_new_value,
                 seed_value, *histories):
            settings = (int(max_new_value), float(temperature_value), int(top_k_value) or None,
                        None if seed_value is None else int(seed_value))
            for updated, note_text in respond(chats, instruction_text, input_value,
                                              list(histories), settings):
                yield "", "", note_text, *updated

        inputs = [instruction, input_text, temperature, top_k, max_new, seed, *boxes]
        outputs = [instruction, input_text, note, *boxes]
        events = [trigger(turn, inputs, outputs, concurrency_id="generate", concurrency_limit=1)
                  for trigger in (instruction.submit, send.click)]
        stop.click(None, cancels=events)
        clear.click(lambda: ("", *[[] for _ in boxes]), None, [note, *boxes], cancels=events)
    return demo


def launch(model_path, compare=None, compare_pretrained=False, adapters=None, device=None,
           host="127.0.0.1", port=None, models=None, **launch_kwargs):
    """Load the model(s), start the app; returns (demo, url). Also the notebook's entry point.

    In Jupyter the app renders inline below the cell and the cell returns; `demo.close()`
    stops it. `models`: already loaded [(ChatModel, info)], instead of the paths.
    """
    from instructkit.devices import choose_device

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: nothing sent out
    if models is None:
        check_port(host, port)  # before the models load
        models = load_models(model_path, choose_device(device), adapters, compare,
                             compare_pretrained)
    demo = build_app(models)
    demo.queue()
    launch_kwargs.setdefault("prevent_thread_lock", True)
    _, url, _ = demo.launch(server_name=host, server_port=port, **launch_kwargs)
    return demo, url


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="A web chat with a finetuned GPT-2, Qwen3 or Llama model (Gradio).")
    add_model_arguments(parser)
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--compare", help="a second model's .pth, answering side by side")
    side.add_argument("--compare-pretrained", action="store_true",
                      help="OpenAI's GPT-2 of the same size side by side (downloaded once into "
                           "gpt2/); for a finetuned hub model, the hub model it started from")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, from 7860)")
    add_decode_arguments(parser)
    return parser


def main(argv=None):
    use_utf8_console()  # UTF-8 out and in, even into a file or a pipe on Windows
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_arguments(args)
    except ExpectedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    try:
        import gradio  # noqa: F401 - checked before the models load
    except ImportError:
        print("error: the web chat needs Gradio: pip install -r requirements-app.txt",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from instructkit.devices import choose_device

    try:
        models = load_models(args.model, choose_device(args.device), args.adapters, args.compare,
                             args.compare_pretrained, tokenizer_dir=args.tokenizer_dir)
        decode_dtype = apply_decode_arguments(args)
        for chat, _ in models:
            chat.decode_dtype = decode_dtype
    except ExpectedError as e:  # a RuntimeError is a bug: it keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for _, info in models:
        print(f"Loaded {describe(info)}", file=sys.stderr)
    demo, url = launch(None, host=args.host, port=args.port, models=models)
    print(f"Chat at {url} (Ctrl-C stops the server)", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
