"""benchmarks/bench.py --tiny: runs to the end, prints every section, and both paths agree."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def tiny_run(shared_data, tmp_path_factory):
    """One --tiny run (a few seconds on a quiet machine), shared by the tests below."""
    output = tmp_path_factory.mktemp("bench") / "results.txt"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--device", "cpu",
         "--data", str(shared_data / "instruction-data.json"), "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    return result, output


def test_tiny_run_exits_cleanly(tiny_run):
    result, _ = tiny_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_tiny_run_prints_every_section(tiny_run):
    out = tiny_run[0].stdout
    for heading in ("== Setup ==", "== tiny ==", "-- training:", "-- generation at batch 1:",
                    "-- all 110 test prompts", "== Summary =="):
        assert heading in out, heading
    assert re.search(r"matmul peak \(measured\): .* ([\d,.]+) GFLOP/s", out)
    assert "simple path: previous_chapters" in out and "fast path:   fast_gpt" in out
    assert "never produce <|endoftext|>" in out


def test_tiny_run_prints_ratio_lines(tiny_run):
    out = tiny_run[0].stdout
    for metric in ("training tokens/s", "generation tokens/s, batch 1", "all test prompts, wall time"):
        match = re.search(rf"^RATIO tiny {re.escape(metric)}: (\d+\.\d+)x$", out, re.MULTILINE)
        assert match and float(match[1]) > 0, metric
    for phase in ("training", "generation, batch 1", "all test prompts"):
        assert re.search(rf"^RATIO tiny peak memory growth, {phase}: simple [\d,]+ MiB, "
                         rf"fast [\d,]+ MiB: [\d.]+x$", out, re.MULTILINE), phase
        assert re.search(rf"^MFU tiny {phase}: simple [\d.]+%, fast [\d.]+%$", out, re.MULTILINE)


def test_tiny_run_reports_absolute_figures(tiny_run):
    out = tiny_run[0].stdout
    assert re.search(r"simple \(AdamW\): [\d,]+ tokens in [\d.]+ s .* tokens/s, MFU", out)
    assert re.search(r"fast +\(AdamW\(fused=True\)\): [\d,]+ tokens in [\d.]+ s", out)
    assert re.search(r"fast  : 24 tokens in [\d.]+ s -> [\d,.]+ tokens/s", out)
    assert re.search(r"fast  : [\d,.]+ s for all 110 prompts", out)
    assert "peak RSS" in out
    # a subset was timed: the run says so
    assert "SCALED" in out
    summary = out[out.index("== Summary =="):]
    for metric, unit in (("training tokens/s", "tokens/s"), ("generation tokens/s, batch 1", "tokens/s"),
                         ("all test prompts, wall time", "s"), ("peak memory growth, training", "MiB"),
                         ("MFU, all test prompts", "%")):
        assert re.search(rf"^tiny +{re.escape(metric)} +[\d,.]+ {re.escape(unit)} +[\d,.]+ "
                         rf"{re.escape(unit)} +[\d.]+x", summary, re.MULTILINE), metric


def test_tiny_run_checks_agreement(tiny_run):
    out = tiny_run[0].stdout
    checks = re.findall(r"^CHECK tiny (.*): (OK|FAILED)$", out, re.MULTILINE)
    names = " | ".join(name for name, _ in checks)
    assert len(checks) == 6, names
    assert all(status == "OK" for _, status in checks), checks
    assert "training losses" in names and "batch-1 greedy tokens" in names
    assert "decode fp32 greedy tokens, parallel vs plain" in names
    assert "decode fp32 greedy tokens, native vs plain" in names  # CI's machine has gcc
    assert "test-prompt answers" in names and "generate_responses" in names
    assert "checks of agreement: all OK" in out


def test_output_file_holds_what_was_printed(tiny_run):
    result, output = tiny_run
    assert output.read_text(encoding="utf-8") == result.stdout


def test_sampled_estimate_runs(shared_data):
    """The CPU default for real models: time sampled uncached steps and sum a fit."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--uncached", "sampled",
         "--samples", "4", "--train-steps", "1", "--prompts", "8",
         "--data", str(shared_data / "instruction-data.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.count("ESTIMATED, not run in full") == 2
    assert re.search(r"CHECK tiny batch-1 greedy tokens.*24/24 identical.*: OK", out)
    assert re.search(r"CHECK tiny test-prompt answers.*4/4 sampled uncached steps equal.*: OK", out)


def test_decode_only_reports_rates_bandwidth_and_bf16_agreement(shared_data):
    """--decode-only: batch-1 decode against the measured read bandwidth, plain and parallel,
    fp32 and bf16, the calibration's pick, and bf16's agreement with fp32 on the test prompts."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--decode-only", "--device", "cpu",
         "--decode-tokens", "8", "--decode-repeats", "1", "--agreement-tokens", "4",
         "--data", str(shared_data / "instruction-data.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "-- training:" not in out and "== Summary ==" not in out  # the decode section only
    assert re.search(r"read bandwidth \(measured\): .* [\d.]+ GB/s", out)
    assert re.search(r"the split products alone, back to back, .*: [\d.]+ GB/s \(\d+% of the plain "
                     r"sum\); the rest of a parallel decode step .*: -?[\d.]+ ms a token$", out,
                     re.MULTILINE)
    for dtype, path in (("fp32", "plain"), ("fp32", "parallel"), ("fp32", "native"),
                        ("bf16", "plain"), ("bf16", "parallel")):
        assert re.search(rf"^  {dtype} fast_gpt {path} +: +[\d,.]+ tokens/s, reads +[\d.]+ GB/s, "
                         rf"\d+% of the limit$", out, re.MULTILINE), (dtype, path)
        assert re.search(rf"^tiny +{dtype} +fast_gpt {path} +[\d,.]+ +[\d.]+ +\d+%$", out,
                         re.MULTILINE), (dtype, path)
    assert re.search(r"the calibration \(auto\) picks: .*(plain|parallel|native)", out)
    for path in ("parallel", "native"):
        assert re.search(rf"^CHECK tiny decode fp32 greedy tokens, {path} vs plain: 8/8 identical: "
                         rf"OK$", out, re.MULTILINE)
    match = re.search(r"^AGREEMENT tiny bf16 vs fp32 greedy answers on the 110 test prompts .*: "
                      r"(\d+)/110 rows identical", out, re.MULTILINE)
    assert match and 0 <= int(match[1]) <= 110
    assert "checks of agreement: all OK" in out


BENCH_LLM = ROOT / "benchmarks" / "bench_llm.py"


@pytest.fixture(scope="module")
def tiny_llm_run(tmp_path_factory):
    """One bench_llm.py --tiny run: tiny Qwen3 and Llama (SmolLM2) models against transformers."""
    pytest.importorskip("transformers")
    output = tmp_path_factory.mktemp("bench_llm") / "results.txt"
    result = subprocess.run(
        [sys.executable, str(BENCH_LLM), "--tiny", "--new-tokens", "8", "--repeats", "1",
         "--steps", "1", "--threads", "1", "--out", str(output)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    return result, output


def test_bench_llm_tiny_runs_every_section_with_numbers(tiny_llm_run):
    result, output = tiny_llm_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert output.read_text(encoding="utf-8") == out  # --out holds what was printed
    assert re.search(r"^machine: .+, \d+ logical CPUs", out, re.MULTILINE)
    assert re.search(r"^torch [\w.+]+ \(1 threads\); transformers [\w.]+", out, re.MULTILINE)
    for label in ("qwen3-0.6b (tiny)", "smollm2-360m (tiny)"):
        section = out[out.index(f"== {label} =="):]
        assert "-- decode at batch 1, fp32 --" in section
        assert re.search(r"read bandwidth \(measured\): .* [\d.]+ GB/s -> limit [\d,.]+ tokens/s",
                         section)
        assert re.search(r"the calibration \(auto, the commands' default\) picks: "
                         r"(plain|parallel|native)$", section, re.MULTILINE), label
        assert re.search(rf"^CHECK {re.escape(label)} fp32 greedy tokens, ours native vs plain: "
                         r"identical: OK$", section, re.MULTILINE), label
        assert re.search(r"the split products alone, .*: [\d.]+ GB/s \(\d+% of the plain sum\)",
                         section), label
        for side in ("ours plain", "ours parallel", "ours native", "ours", "transformers"):
            assert re.search(rf"^  fp32 {side} +: +[\d,.]+ tokens/s, reads +[\d.]+ GB/s, \d+% of "
                             r"the limit$", section, re.MULTILINE), (label, side)
        # the same weights on both sides: the same greedy tokens, logits equal to rounding
        match = re.search(rf"^AGREEMENT {re.escape(label)} fp32 greedy tokens, ours vs "
                          r"transformers: 8/8 identical; logits on the prompt: max \|ours - "
                          r"transformers\| ([\d.e+-]+) .*: OK$", section, re.MULTILINE)
        assert match and float(match[1]) < 1e-4, label
        for run in ("ours full", "transformers full", "ours LoRA"):
            assert re.search(rf"^  {run} +: step 1 \(untimed\) [\d.]+ s, then 1 steps in [\d.]+ s "
                             r"-> [\d,.]+ tokens/s", section, re.MULTILINE), (label, run)
            match = re.search(rf"^  peak RSS {run} +: ([\d.]+) GiB", section, re.MULTILINE)
            assert match and float(match[1]) > 0, (label, run)
        assert re.search(rf"^CHECK {re.escape(label)} first training loss, ours vs transformers: "
                         r"[\d.]+ vs [\d.]+ .*: OK$", section, re.MULTILINE), label
        # LoRA trains the adapters only: fewer parameters than full finetuning
        full, lora = (int(re.search(rf"^  {run} +:.*trainable ([\d,]+)", section,
                                    re.MULTILINE)[1].replace(",", ""))
                      for run in ("ours full", "ours LoRA"))
        assert 0 < lora < full
    summary = out[out.index("== Summary =="):]
    for label in ("qwen3-0.6b (tiny)", "smollm2-360m (tiny)"):
        for metric in ("decode fp32 tokens/s", "training tokens/s (full)"):
            assert re.search(rf"^{re.escape(label)} +{re.escape(metric)} +[\d,.]+ +[\d,.]+ +"
                             r"[\d.]+x +\(>= 1x (MET|MISSED)\)$", summary, re.MULTILINE), metric
        for metric in ("peak RSS GiB, full finetuning", "peak RSS GiB, LoRA (rank 16)"):
            assert re.search(rf"^{re.escape(label)} +{re.escape(metric)} +[\d.]+", summary,
                             re.MULTILINE), metric
    assert "checks of agreement: all OK" in out


def test_bench_llm_rejects_unknown_model():
    result = subprocess.run([sys.executable, str(BENCH_LLM), "--models", "gpt2-small"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "unknown model 'gpt2-small'" in result.stderr


def test_train_step_variants_tiny_run(shared_data):
    """benchmarks/train_step_variants.py --tiny: every CPU variant trains and reports its rate."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step_variants.py"), "--tiny",
         "--data", str(shared_data / "instruction-data.json")],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^tiny +(.+?) +([\d,]+) tokens/s, waits for the GPU 0 times a step$",
                      result.stdout, re.MULTILINE)
    assert [name for name, _ in rows] == [
        "book's loss, fp32, AdamW (the book)", "book's loss, fp32/TF32, fused AdamW",
        "packed rows, fp32/TF32, fused AdamW", "fast_gpt now, fp32/TF32, fused AdamW"]
    assert all(int(rate.replace(",", "")) > 0 for _, rate in rows)
