"""Everything beyond the book: the command lines and the machinery behind them.

The chapter's own files sit one folder up (the notebooks, `previous_chapters.py`,
`gpt_download.py`, `gpt_instruction_finetuning.py`, `ollama_evaluate.py`, `fast_gpt.py`,
`exercise_variants.py`); this package builds on them and never the other way round, except
through lines marked `# Not in the book:` there.
"""

from pathlib import Path

# The chapter's folder: by default, the data, GPT-2's weights and the outputs go here.
CHAPTER_DIR = Path(__file__).resolve().parent.parent
