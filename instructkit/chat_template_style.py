"""`--prompt-style chat`: the prompt written in a hub model's own chat template.

Not in the book, whose prompts are the chapter's Alpaca text and exercise 7.1's Phi-3 text.
Qwen3 and SmolLM2 repositories ship a chat template (a jinja2 template in
tokenizer_config.json) that turns a list of messages into the text the model was trained on.
`chat_template_style(tokenizer)` makes a PromptStyle of it (exercise_variants.PromptStyle,
the same three parts as ALPACA and PHI3), so the chapter's datasets, masking, training and
answers use it unchanged:
- the prompt: the entry's instruction (and input, after a blank line) as the user's message,
  rendered with the assistant's turn opened (`add_generation_prompt`);
- the response follows it directly, and the collate function's end-of-text token closes it;
- the answer: the text after the prompt.
A tokenizer without a chat template (Llama 3.2 base, GPT-2) is a one-line BadInputError.
"""

from exercise_variants import PromptStyle
from instructkit.errors import BadInputError

STYLE_NAME = "chat"


class NoChatTemplateError(BadInputError):
    """--prompt-style chat for a model whose tokenizer has no chat template."""


def user_message(entry):
    """The entry's instruction, and its input after a blank line when it has one."""
    return entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")


def chat_template_style(tokenizer, model_name="this model"):
    """The PromptStyle of `tokenizer`'s chat template (an hf_tokenizer.HFTokenizer)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise NoChatTemplateError(f"--prompt-style chat uses the model's own chat template, and "
                                  f"{model_name} has none: use --prompt-style alpaca or phi3")
    # A template that writes the BOS text (Llama 3's) would get a second BOS from encode,
    # which adds its own: the rendered text leaves it out
    adds_bos = tokenizer.bos_token_id is not None and tokenizer.encode("")[:1] == [tokenizer.bos_token_id]
    bos_text = tokenizer.bos_token if adds_bos else None

    def format_input(entry):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_message(entry)}],
                                             add_generation_prompt=True)
        return text.removeprefix(bos_text) if bos_text else text

    def extract_response(response_text, input_text):
        return response_text[len(input_text):].strip()

    return PromptStyle(STYLE_NAME, format_input, "", extract_response)
