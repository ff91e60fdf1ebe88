"""DPO's reference runs in the policy's precision, and the run record says which.

bfloat16 autocast runs on the CPU, so the real computation is checked here: while the policy
still equals its reference, log-probabilities computed in the same precision are equal, every
reward is exactly 0 and the loss is ln 2. A reference computed in float32 for a bfloat16 policy
(what DPO did before) is off by bfloat16's rounding, and the tests would see it.
"""

import json
import math

import pytest
import torch

from instructkit import dpo, fast_dpo
from instructkit import dpo_train as dpo_cli
from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from instructkit.precision import resolve_precision
from instructkit.run_record import read_metrics
from instructkit.safe_files import write_json
from previous_chapters import GPTModel

BETA = 0.1
BF16 = resolve_precision("bf16", "cpu")
FP32 = resolve_precision("fp32", "cpu")


@pytest.fixture(scope="module")
def pairs(one_thread, shared_data, tokenizer):
    """A tiny random policy, its frozen copy, and 8 real preference pairs cut to 100 tokens."""
    from instructkit.instruction_data import PREFERENCE_KEYS, load_instruction_file

    entries = load_instruction_file(shared_data / "instruction-data-with-preference.json",
                                    keys=PREFERENCE_KEYS)[:8]
    cfg = {"vocab_size": 50257, "context_length": 128, "emb_dim": 32, "n_heads": 4,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
    torch.manual_seed(123)
    policy = GPTModel(cfg).eval()
    reference = dpo.make_reference_model(policy)
    return policy, reference, dpo.PreferenceDataset(entries, tokenizer)


def cached_batch(reference, dataset, precision):
    cached = fast_dpo.cache_reference_logprobs(reference, dataset, batch_size=8,
                                               precision=precision, allowed_max_length=100)
    return fast_dpo.collate_with_reference(cached, allowed_max_length=100)


def test_cached_reference_in_bf16_equals_the_bf16_policy(pairs):
    policy, reference, dataset = pairs
    batch = cached_batch(reference, dataset, BF16)
    with BF16.autocast():  # the policy's first step, computed as training computes it
        policy_chosen, policy_rejected = fast_dpo.dpo_logprobs(policy, batch)
    assert torch.equal(batch["reference_chosen_logprobs"], policy_chosen.detach())
    assert torch.equal(batch["reference_rejected_logprobs"], policy_rejected.detach())

    loss, chosen_reward, rejected_reward = fast_dpo.compute_dpo_loss_batch_fast(
        batch, policy, None, BETA, precision=BF16)
    assert chosen_reward.item() == 0.0 and rejected_reward.item() == 0.0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)

    # The same log-probabilities in float32 differ by bfloat16's rounding: a float32 reference
    # for a bfloat16 policy would start DPO with rewards that are not 0.
    with torch.inference_mode():
        fp32_chosen, _ = fast_dpo.dpo_logprobs(reference, batch)
    assert (fp32_chosen - policy_chosen.detach()).abs().max() > 1e-3
    mixed = cached_batch(reference, dataset, FP32)
    _, mixed_reward, _ = fast_dpo.compute_dpo_loss_batch_fast(mixed, policy, None, BETA,
                                                              precision=BF16)
    assert abs(mixed_reward.item()) > 1e-5


def test_default_cache_uses_the_default_loss_autocast(pairs):
    """Without a precision (the notebook's way), the cache and the loss agree too: on the CPU
    both in float32, equal to the plain loss's reference."""
    policy, reference, dataset = pairs
    batch = cached_batch(reference, dataset, None)
    with torch.no_grad():
        plain = dpo.compute_logprobs(reference(batch["chosen"]), batch["chosen"],
                                     batch["chosen_mask"])
    torch.testing.assert_close(batch["reference_chosen_logprobs"], plain, rtol=1e-5, atol=1e-5)
    _, chosen_reward, _ = fast_dpo.compute_dpo_loss_batch_fast(batch, policy, None, BETA)
    assert chosen_reward.item() == 0.0


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "tiny-sft.pth"
    torch.manual_seed(123)
    torch.save(GPTModel(TEST_MODE_CONFIG).state_dict(), path)
    write_json(tmp_path / "tiny-sft.run.json", {"model_config": TEST_MODE_CONFIG})
    return path


def run_dpo(sft_file, shared_data, out, *extra):
    args = dpo_cli.build_arg_parser().parse_args([
        "--test-mode", "--sft-model", str(sft_file), "--device", "cpu", "--tokenizer-dir",
        str(shared_data / "gpt2-tokenizer"), "--data",
        str(shared_data / "instruction-data-with-preference.json"), "--batch-size", "4",
        "--eval-freq", "1", "--eval-iter", "1", "--max-new-tokens", "2", "--output-dir",
        str(out), *extra])
    return dpo_cli.main(dpo_cli.DPOConfig(**vars(args)))


@pytest.mark.slow
@pytest.mark.parametrize("plain", [False, True])
def test_the_command_in_bf16_computes_the_reference_in_bf16_and_records_it(
        one_thread, sft_file, shared_data, tmp_path, capsys, plain):
    """--lr 0 keeps the policy equal to its reference, so in one precision the rewards are 0.

    Exactly 0 where the reference saw the same batches as the policy: the validation batches
    (in order, the cache's batch size) with the cached reference, every batch with --plain's
    reference computed per batch. (The shuffled training batches pack other rows together than
    the cache did, which moves bfloat16's rounding by a few 1e-6.)
    """
    result = run_dpo(sft_file, shared_data, tmp_path / "out", "--precision", "bf16", "--lr", "0",
                     *(["--plain"] if plain else []))
    assert "Precision: bf16 (bfloat16 autocast; requested)" in capsys.readouterr().out
    rows = read_metrics(result["paths"]["metrics"])
    assert len(rows) == 2
    for row in rows:
        for split in ("train", "val") if plain else ("val",):
            assert row[f"{split}_chosen_reward"] == 0.0 and row[f"{split}_rejected_reward"] == 0.0
        # --plain's log-softmax runs in bfloat16 on the CPU (CUDA's autocast keeps it float32),
        # so its loss is ln 2 rounded to bfloat16; fast_dpo's is computed in float32
        assert row["val_loss"] == pytest.approx(math.log(2), abs=3e-3 if plain else 1e-6)
    record = json.loads(result["paths"]["record"].read_text())
    assert record["precision"] == "bf16" and record["reference_precision"] == "bf16"
    assert record["config"]["precision"] == "bf16"


@pytest.mark.slow
def test_the_command_on_the_cpu_defaults_to_fp32(one_thread, sft_file, shared_data, tmp_path,
                                                 capsys):
    result = run_dpo(sft_file, shared_data, tmp_path / "out", "--max-steps", "1", "--save-every",
                     "1")
    assert result["tracking"] is None  # stopped by --max-steps: nothing recorded yet
    assert "Precision: fp32 (float32; auto: float32 on CPU)" in capsys.readouterr().out


def test_the_command_refuses_fp16_on_the_cpu_in_one_line(sft_file, shared_data, tmp_path, capsys):
    code = dpo_cli.cli(["--test-mode", "--sft-model", str(sft_file), "--device", "cpu",
                        "--precision", "fp16", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("error: fp16 training needs a CUDA GPU; on CPU use --precision fp32 "
                           "(or bf16).")
