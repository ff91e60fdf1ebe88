"""The student notebook's checks (instructkit/exercise_checks.py): they pass on the chapter's
code, and on typical wrong answers (tests/exercise_mistakes.py) they fail and say which
mistake it is; stubs are "not done yet", other exceptions are reported with the student's
traceback lines, and no message shows the solution's code."""

import inspect
import json

import exercise_mistakes as m
import pytest
import torch

from instructkit import exercise_checks as xc

pytestmark = pytest.mark.usefixtures("one_thread")

# (exercise, wrong answer, words its check must say)
MISTAKES = [
    ("format_input", m.format_input_always_input, "the '### Input:' section is there for an empty input"),
    ("format_input", m.format_input_single_newlines, "the sections are separated by one line break"),
    ("format_input", m.format_input_no_space, "the two sentences of the preamble need a space"),
    ("format_input", m.format_input_with_response, "the prompt ends before '### Response:'"),
    ("custom_collate_fn", m.collate_masks_every_pad,
     "every padding token was masked; the first one must stay (as the end-of-text target) so that "
     "the model learns to stop"),
    ("custom_collate_fn", m.collate_forgets_the_shift, "the targets are not shifted"),
    ("custom_collate_fn", m.collate_no_mask, "the padding tokens after the first are not replaced by -100"),
    ("custom_collate_fn", m.collate_changes_the_batch, "changed the batch it was given"),
    ("custom_collate_fn", m.collate_ignores_max_length, "allowed_max_length was ignored"),
    ("extract_response", m.extract_keeps_heading, "'### Response:' was left in the answer"),
    ("extract_response", m.extract_keeps_prompt, "the answer still starts with the prompt"),
    ("extract_response", m.extract_no_strip, "strip the whitespace at both ends"),
    ("format_input_phi", m.phi_with_assistant_tag, "the prompt ends before '<|assistant|>:'"),
    ("format_input_phi", m.phi_blank_lines, "Phi-3 uses a single line break"),
    ("format_input_phi", m.phi_always_input, "a line for the input is added although the input is empty"),
    ("format_input_phi", m.phi_as_alpaca, "this is the chapter's Alpaca prompt"),
    ("custom_collate_with_masking_fn", m.masking(1), "one target too many is masked"),
    ("custom_collate_with_masking_fn", m.masking(-1), "one target too few is masked"),
    ("custom_collate_with_masking_fn", m.masking_without_masking, "the prompt's targets were not masked"),
    ("custom_collate_with_masking_fn", m.masking_the_inputs, "the inputs contain the ignore index -100"),
    ("LoRALayer", m.LoRARandomB, "B does not start at zero"),
    ("LoRALayer", m.LoRAZeroA, "A starts at zero"),
    ("LoRALayer", m.LoRANoAlpha, "alpha is not applied"),
    ("LoRALayer", m.LoRAOverRank, "scaled by alpha / rank"),
    ("LoRALayer", m.LoRATransposed, "A and B are transposed"),
    ("LinearWithLoRA", m.LinearLoRAOnly, "the wrapped layer's output is missing"),
    ("LinearWithLoRA", m.LinearWithoutLoRA, "the LoRA update is not added"),
    ("LinearWithLoRA", m.LinearRandomB, "its LoRA layer's B does not start at zero"),
    ("LinearWithLoRA", m.LinearNewLinear, "must keep the layer it is given as self.linear"),
]


def _solution_lines(exercise):
    """The solution's code lines long enough to give it away."""
    reference = xc.EXERCISES[exercise].reference
    source = inspect.getsource(reference.__wrapped__ if hasattr(reference, "__wrapped__") else reference)
    return [line.strip() for line in source.splitlines()
            if len(line.strip()) > 20 and not line.strip().startswith(("def ", "class ", '"""', "#"))]


@pytest.mark.parametrize("name", list(xc.EXERCISES))
def test_every_check_passes_on_the_chapter_s_code(name, capsys):
    result = xc.check(name, xc.EXERCISES[name].reference)
    assert (result.status, result.exercise) == (xc.PASSED, name), result.message
    # and what a check cell prints
    getattr(xc, "check_" + {"LoRALayer": "lora_layer", "LinearWithLoRA": "linear_with_lora"}.get(
        name, name))(xc.EXERCISES[name].reference)
    assert capsys.readouterr().out.startswith(f"{name}: passed.")


def test_the_right_answers_written_independently_pass_too():
    """The fixtures' own (right) versions: not the chapter's functions, the same results."""
    assert xc.check("custom_collate_fn", m.collate).status == xc.PASSED
    assert xc.check("custom_collate_with_masking_fn", m.masking(0)).status == xc.PASSED
    assert xc.check("LoRALayer", m.LoRALayer).status == xc.PASSED
    assert xc.check("LinearWithLoRA", m.LinearWithLoRA).status == xc.PASSED


@pytest.mark.parametrize(("name", "wrong", "words"), MISTAKES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(MISTAKES)])
def test_a_typical_mistake_fails_with_its_explanation(name, wrong, words):
    result = xc.check(name, wrong)
    assert result.status == xc.FAILED, result.text()
    assert words in result.message, result.message
    assert not [line for line in _solution_lines(name) if line in result.message]


def test_every_exercise_has_two_typical_mistakes_or_more():
    counts = {name: sum(1 for n, _, _ in MISTAKES if n == name) for name in xc.EXERCISES}
    assert min(counts.values()) >= 2, counts


def test_a_message_names_the_shape_and_the_first_difference():
    result = xc.check("custom_collate_fn", m.collate_masks_every_pad)
    assert "the targets differ first at row 0, position 4: expected 50256, got -100" in result.message
    assert "expected row 0: [1, 2, 3, 4, 50256]" in result.message
    result = xc.check("custom_collate_fn", lambda batch, *a, **k: m.collate(batch, *a, **k, plus_one=False))
    assert "the inputs have shape (3, 4), expected (3, 5)" in result.message
    assert "one longer than the longest item" in result.message
    result = xc.check("extract_response", m.extract_keeps_heading)
    assert "differ at character 0:\n  expected 'The correct spelling is '" in result.message


def test_a_stub_is_not_done_yet():
    def format_input(entry):
        raise NotImplementedError  # replace this line with your code

    result = xc.check("format_input", format_input)
    assert result.status == xc.NOT_DONE
    assert result.text().startswith("format_input: not done yet (format_input still raises")

    class LoRALayer(torch.nn.Module):
        def __init__(self, in_dim, out_dim, rank, alpha):
            super().__init__()
            raise NotImplementedError

    class Linear(m.LinearWithLoRA):
        lora_class = LoRALayer

    assert xc.check("LoRALayer", LoRALayer).status == xc.NOT_DONE
    result = xc.check("LinearWithLoRA", Linear)  # done, but its LoRALayer is not
    assert result.status == xc.NOT_DONE
    assert "LoRALayer.__init__, which it calls, still raises NotImplementedError" in result.message


def test_another_exception_is_reported_with_the_student_s_lines():
    def extract_response(response_text, input_text):
        # a generated text without the heading: IndexError
        return response_text.split("### Response:")[1].strip()

    result = xc.check("extract_response", extract_response)
    assert result.status == xc.CRASHED
    lines = result.message.splitlines()
    assert lines[0] == "IndexError: list index out of range"
    assert lines[1].endswith('in extract_response: return response_text.split("### Response:")[1].strip()')
    assert len(lines) == 2  # the checks' own frames are left out
    assert result.text().startswith("extract_response: CRASHED (your code raised an exception)")

    def collate(batch, *args, **kwargs):
        return torch.tensor(batch)  # ragged lists: PyTorch's ValueError

    result = xc.check("custom_collate_fn", collate)
    assert result.status == xc.CRASHED and result.message.startswith("ValueError: ")


def test_a_not_implemented_error_from_pytorch_is_a_crash_not_a_blank():
    class LoRALayer(m.LoRALayer):
        def forward(self, x):
            return torch.empty(1, device="meta").tolist()  # PyTorch: NotImplementedError

    result = xc.check("LoRALayer", LoRALayer)
    assert result.status == xc.CRASHED
    assert result.message.startswith("NotImplementedError: Cannot copy out of meta tensor")
    assert "in forward: return torch.empty(1, device=\"meta\").tolist()" in result.message


def test_the_wrong_type_is_said_in_words():
    assert "returned list" in xc.check("format_input", lambda entry: [entry["instruction"]]).message
    result = xc.check("custom_collate_fn", lambda batch, *a, **k: m.collate(batch, *a, **k)[0])
    assert "expected a tuple (inputs, targets) of two tensors" in result.message

    def floats(batch, *args, **kwargs):
        inputs, targets = m.collate(batch, *args, **kwargs)
        return inputs.float(), targets

    assert "the inputs are torch.float32" in xc.check("custom_collate_fn", floats).message


def test_the_examples_are_the_chapter_s_entries(instruction_data):
    assert xc.ENTRIES[0] == instruction_data[50] and xc.ENTRIES[1] == instruction_data[999]


def test_a_check_cell_appends_its_result_for_the_grader(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv(xc.RESULTS_ENV, str(results))
    xc.check_format_input(m.format_input_single_newlines)
    xc.check_extract_response(xc.EXERCISES["extract_response"].reference)
    lines = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    assert [(r["exercise"], r["status"]) for r in lines] == [("format_input", "failed"),
                                                           ("extract_response", "passed")]
    assert "one line break" in lines[0]["message"]
    out = capsys.readouterr().out
    assert out.startswith("format_input: FAILED\n    example 1 (with input): the texts differ")
