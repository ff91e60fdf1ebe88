"""The greedy answers to many instructions at once, as section 7.7 collects them.

The book answers one test entry at a time with `generate(..., eos_id=50256)`, recomputing the
whole text for every new token. `generate_responses` gives the same greedy answers (up to
float rounding breaking a near-tie; fast_gpt's tests compare the two) through fast_gpt (for
Qwen3 and Llama models fast_llm, fast_llm.fast_path): prompts of similar length batched
together, left-padded, with a key/value cache, up to the tokenizer's end-of-text id
(`eot_token`). Each answer is cut from the generated text as the prompt style's
`extract_response` cuts it.
"""


def generate_answer_texts(model, input_texts, tokenizer, max_new_tokens=256, batch_size=16,
                          progress=True, decode_dtype=None):
    """The text greedy decoding adds to each prompt text, up to the end-of-text token.

    Prompts longer than the model's context keep their last `context_length` tokens, as the
    book's `generate` crops them. decode_dtype: torch.bfloat16 decodes with bf16 copies of the
    weights (--decode-dtype bf16; answers may differ), None with the model's own.
    """
    from instructkit.fast_llm import context_size as context_size_of
    from instructkit.fast_llm import fast_path

    context_size = context_size_of(model)
    # The end-of-text id: GPT-2's 50256 (tiktoken's eot_token), a hub model's EOS (hf_tokenizer)
    eos_id = tokenizer.eot_token
    prompts = [tokenizer.encode(text)[-context_size:] for text in input_texts]
    model.eval()
    answers = fast_path(model).generate_answer_ids(model, prompts, max_new_tokens, context_size,
                                                   eos_id, batch_size=batch_size, progress=progress,
                                                   decode_dtype=decode_dtype)
    # only the new ids are decoded: a decoded prompt need not equal its text (Llama's BOS)
    return [tokenizer.decode(ids) for ids in answers]


def generate_responses(model, entries, tokenizer, style, max_new_tokens=256, batch_size=16,
                       progress=True, decode_dtype=None):
    """The greedy answer to every entry, its prompt written in `style` (a PromptStyle:
    the chapter's gpt_instruction_finetuning.ALPACA, or exercise 7.1's PHI3)."""
    input_texts = [style.format_input(entry) for entry in entries]
    answers = generate_answer_texts(model, input_texts, tokenizer, max_new_tokens, batch_size,
                                    progress, decode_dtype)
    return [style.extract_response(input_text + answer, input_text)
            for input_text, answer in zip(input_texts, answers, strict=True)]
