"""DPO from scratch (dpo.py): the loss by hand, the masks, the frozen reference, learning."""

import json
import math
import os
import re
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import ROOT
from interrupting import (
    checkpoint_cut_by_a_second_ctrl_c,
    run_and_act,
    twice_during_a_checkpoint_write,
)
from portable import send_interrupt
from torch.utils.data import DataLoader

from gpt_instruction_finetuning import format_input
from instructkit import dpo, fast_dpo
from instructkit import dpo_train as dpo_cli
from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from instructkit.instruction_data import PREFERENCE_KEYS, load_instruction_file
from instructkit.model_files import ModelFileError, load_sft_model
from instructkit.run_record import read_metrics
from instructkit.safe_files import write_json
from previous_chapters import GPTModel

BETA = 0.1


@pytest.fixture(scope="module")
def preference_data(shared_data):
    return load_instruction_file(shared_data / "instruction-data-with-preference.json",
                                 keys=PREFERENCE_KEYS)


def tiny_model(cfg, seed=123):
    torch.manual_seed(seed)
    return GPTModel(cfg)


def loader(dataset, batch_size=4, shuffle=False):
    torch.manual_seed(123)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      collate_fn=partial(dpo.preference_collate_fn, allowed_max_length=64))


# ---------------------------------------------------------------------------------------
# The loss, on numbers
# ---------------------------------------------------------------------------------------


def test_dpo_loss_equals_the_hand_computed_value():
    t = partial(torch.tensor, dtype=torch.float64)
    loss, chosen_rewards, rejected_rewards = dpo.compute_dpo_loss(
        model_chosen_logprobs=t([-1.0, -2.0]), model_rejected_logprobs=t([-3.0, -1.5]),
        reference_chosen_logprobs=t([-1.5, -2.0]), reference_rejected_logprobs=t([-2.0, -1.0]),
        beta=BETA)
    # Policy log-ratios 2.0 and -0.5; reference log-ratios 0.5 and -1.0; differences 1.5, 0.5.
    expected = (math.log(1 + math.exp(-0.15)) + math.log(1 + math.exp(-0.05))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert chosen_rewards.item() == pytest.approx(0.1 * (0.5 + 0.0) / 2, rel=1e-12)
    assert rejected_rewards.item() == pytest.approx(0.1 * (-1.0 - 0.5) / 2, rel=1e-12)


def test_compute_logprobs_averages_the_selected_next_token_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, 0, 1, 1]])
    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    log_probs = torch.log_softmax(logits, dim=-1)
    # Token t is predicted by the logits at t - 1.
    row0 = (log_probs[0, 1, 3] + log_probs[0, 2, 4]) / 2
    row1 = (log_probs[1, 0, 0] + log_probs[1, 1, 1]) / 2
    assert torch.allclose(dpo.compute_logprobs(logits, labels, mask), torch.stack([row0, row1]))
    all_tokens = torch.stack([log_probs[0, [0, 1, 2], [2, 3, 4]].mean(),
                              log_probs[1, [0, 1, 2], [0, 1, 1]].mean()])
    assert torch.allclose(dpo.compute_logprobs(logits, labels), all_tokens)


# ---------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------


def test_response_masks_cover_exactly_the_response_tokens(preference_data, tokenizer):
    entries = preference_data[:24]
    dataset = dpo.PreferenceDataset(entries, tokenizer)
    for start in range(0, len(entries), 8):  # batches of 8: rows of different lengths, padded
        batch = dpo.preference_collate_fn([dataset[i] for i in range(start, start + 8)])
        lengths = [len(dataset[i]["chosen"]) for i in range(start, start + 8)]
        assert batch["chosen"].shape == batch["rejected"].shape
        assert batch["chosen"].shape[1] >= max(lengths)
        for row in range(8):
            entry = entries[start + row]
            for key in ("chosen", "rejected"):
                ids, mask = batch[key][row], batch[f"{key}_mask"][row]
                assert tokenizer.decode(ids[mask].tolist()) == entry[key]
                # The selected tokens are one run at the end of the real tokens.
                n_real = len(dataset[start + row][key])
                assert mask.nonzero().squeeze(1).tolist() == list(
                    range(dataset[start + row]["response_start"], n_real))
                assert (ids[n_real:] == 50256).all()
            prompt = batch["prompt"][row]
            assert tokenizer.decode(prompt[:len(dataset[start + row]["prompt"])].tolist()) \
                == format_input(entry)


def test_without_prompt_masking_the_mask_hides_only_the_padding(preference_data, tokenizer):
    dataset = dpo.PreferenceDataset(preference_data[:4], tokenizer)
    batch = dpo.preference_collate_fn([dataset[i] for i in range(4)], mask_prompt_tokens=False,
                                      allowed_max_length=50)
    assert batch["chosen"].shape[1] == 50
    for row in range(4):
        for key in ("chosen", "rejected"):
            n_real = min(len(dataset[row][key]), 50)
            assert batch[f"{key}_mask"][row].tolist() == [True] * n_real + [False] * (50 - n_real)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_ln2_and_zero_margins(one_thread, tiny_cfg, preference_data,
                                                              tokenizer):
    policy = tiny_model(tiny_cfg)
    reference = dpo.make_reference_model(policy)
    batch = next(iter(loader(dpo.PreferenceDataset(preference_data[:4], tokenizer))))
    loss, chosen_rewards, rejected_rewards = dpo.compute_dpo_loss_batch(batch, policy, reference, BETA)
    assert loss.item() == torch.tensor(math.log(2)).item()  # -log sigmoid(0), in float32
    assert chosen_rewards.item() == 0.0 and rejected_rewards.item() == 0.0


def test_the_reference_model_is_a_frozen_copy(tiny_cfg):
    policy = tiny_model(tiny_cfg)
    reference = dpo.make_reference_model(policy)
    assert not reference.training and policy.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    assert all(p.data_ptr() != q.data_ptr()
               for p, q in zip(policy.parameters(), reference.parameters(), strict=True))


def train_tiny(cfg, train_entries, val_entries, tokenizer, steps_per_epoch_batches=4, epochs=3,
               lr=1e-3, loss_fn=dpo.compute_dpo_loss_batch):
    policy = tiny_model(cfg)
    reference = dpo.make_reference_model(policy)
    train_loader = loader(dpo.PreferenceDataset(train_entries, tokenizer), steps_per_epoch_batches,
                          shuffle=True)
    val_loader = loader(dpo.PreferenceDataset(val_entries, tokenizer), 8)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.01)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    tracking = dpo.train_model_dpo_simple(policy, reference, train_loader, val_loader, optimizer,
                                          num_epochs=epochs, beta=BETA, eval_freq=4, eval_iter=2,
                                          start_context=None, tokenizer=tokenizer, loss_fn=loss_fn)
    return policy, reference, before, tracking, val_loader


@pytest.fixture(scope="module")
def trained(one_thread, preference_data, tokenizer):
    """A tiny random GPT after 8 steps (2 epochs of 4 batches of 8 pairs) at a high learning
    rate, through the fast batch loss (equal to the plain one, tested below; 3x quicker)."""
    cfg = {"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    return train_tiny(cfg, preference_data[:32], preference_data[1000:1016], tokenizer,
                      steps_per_epoch_batches=8, epochs=2, lr=2e-2,
                      loss_fn=fast_dpo.compute_dpo_loss_batch_fast)


def test_the_reference_model_never_changes(trained):
    policy, reference, before, _, _ = trained
    after = reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in reference.parameters())
    assert any(not torch.equal(p, q) for p, q in
               zip(policy.parameters(), reference.parameters(), strict=True))  # the policy moved


def test_training_raises_the_margin_on_held_out_pairs(trained):
    policy, reference, _, tracking, val_loader = trained
    # Held-out pairs: before training the margin is 0 and the loss ln 2 (policy == reference).
    loss, chosen, rejected = dpo.compute_dpo_loss_loader(val_loader, policy, reference, BETA)
    assert chosen - rejected > 0.01 and loss < math.log(2) - 0.005
    margins = dpo.reward_margins(tracking, "val")  # after steps 0 and 4
    assert 0 < margins[0] < margins[1] < chosen - rejected
    train_margins = dpo.reward_margins(tracking, "train")
    assert train_margins[1] > train_margins[0] > 0 and train_margins[1] > 0.1
    assert len(tracking["train_losses"]) == len(tracking["tokens_seen"]) == 2


def test_training_prints_losses_and_margins(one_thread, tiny_cfg, preference_data, tokenizer, capsys):
    train_tiny(tiny_cfg, preference_data[:4], preference_data[4:8], tokenizer, epochs=1)
    out = capsys.readouterr().out
    assert out.startswith("Ep 1 (Step 000000): Train loss 0.69")
    assert "Val loss 0.69" in out and "Train reward margins" in out and "Val reward margins" in out


# ---------------------------------------------------------------------------------------
# The fast path equals the plain one
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moved(one_thread, preference_data, tokenizer):
    """A policy a little away from its reference (so rewards are not 0), and 8 real pairs
    cut to 100 tokens: rows of different lengths, some responses cut short."""
    cfg = {"vocab_size": 50257, "context_length": 128, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    policy = tiny_model(cfg)
    reference = dpo.make_reference_model(policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dataset = dpo.PreferenceDataset(preference_data[:8], tokenizer)
    batch = dpo.preference_collate_fn([dataset[i] for i in range(8)], allowed_max_length=100)
    return policy, reference, dataset, batch


@pytest.mark.parametrize("mask_prompt_tokens", [True, False])
def test_packed_logprobs_equal_the_plain_ones(moved, mask_prompt_tokens):
    policy, _, dataset, _ = moved
    batch = dpo.preference_collate_fn([dataset[i] for i in range(8)], allowed_max_length=100,
                                      mask_prompt_tokens=mask_prompt_tokens)
    for key in ("chosen", "rejected"):
        ids, mask = batch[key], batch[f"{key}_mask"]
        assert mask[:, 1:].sum(1).min() > 0 and (~mask[:, -1]).any()  # cut and padded rows
        plain = dpo.compute_logprobs(policy(ids), ids, mask)
        fast = fast_dpo.packed_logprobs(policy, ids, mask)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_fast_batch_loss_and_gradients_equal_the_plain_ones(moved):
    policy, reference, _, batch = moved
    grads = []
    for loss_fn in (dpo.compute_dpo_loss_batch, fast_dpo.compute_dpo_loss_batch_fast):
        policy.zero_grad()
        loss, chosen, rejected = loss_fn(batch, policy, reference, BETA)
        loss.backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
        if loss_fn is dpo.compute_dpo_loss_batch:
            expected = (loss, chosen, rejected)
        else:
            for got, want in zip((loss, chosen, rejected), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(expected[1] - expected[2]) > 1e-4  # the policy differs from the reference
    for fast, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-8)
    policy.zero_grad()


def test_cached_reference_logprobs_give_the_same_loss(moved):
    policy, reference, dataset, batch = moved
    expected = dpo.compute_dpo_loss_batch(batch, policy, reference, BETA)
    cached = fast_dpo.cache_reference_logprobs(reference, dataset, batch_size=3,
                                               allowed_max_length=100)
    assert len(cached) == len(dataset) and cached[5]["chosen"] == dataset[5]["chosen"]
    cached_batch = fast_dpo.collate_with_reference(cached, allowed_max_length=100)
    # The reference model is not needed any more: None would fail if it were called.
    got = fast_dpo.compute_dpo_loss_batch_fast(cached_batch, policy, None, BETA)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def test_sft_model_loads_with_its_config_from_record_size_or_shapes(tmp_path):
    """The SFT model's config: the run record, else the shapes; its logits equal the saved model's."""
    saved = tiny_model(TEST_MODE_CONFIG).eval()
    path = tmp_path / "tiny-sft.pth"
    torch.save(saved.state_dict(), path)
    ids = torch.tensor([[1, 2, 3, 4]])
    for record in (None, {"model_config": TEST_MODE_CONFIG}):
        if record is not None:
            write_json(tmp_path / "tiny-sft.run.json", record)
        loaded, cfg = load_sft_model(path)
        assert cfg == TEST_MODE_CONFIG and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(ids), saved(ids))
    # --model names a size, which wins over the record: this file is not gpt2-small.
    with pytest.raises(ModelFileError, match="does not fit a GPTModel with emb_dim 768, 12 layers"):
        load_sft_model(path, model="gpt2-small")


@pytest.fixture
def sft_file(tmp_path):
    """A tiny 'finetuned' model saved as the chapter saves it, with a run record beside it."""
    path = tmp_path / "tiny-sft.pth"
    torch.save(tiny_model(TEST_MODE_CONFIG).state_dict(), path)
    write_json(tmp_path / "tiny-sft.run.json", {"model_config": TEST_MODE_CONFIG})
    return path


def cli_args(sft_file, shared_data, *extra):
    return ["--test-mode", "--sft-model", str(sft_file), "--tokenizer-dir",
            str(shared_data / "gpt2-tokenizer"), "--data",
            str(shared_data / "instruction-data-with-preference.json"), "--lr", "1e-3",
            "--batch-size", "4", "--eval-freq", "1", "--eval-iter", "1", "--max-new-tokens", "4",
            *extra]


@pytest.mark.slow
def test_cli_end_to_end(one_thread, sft_file, shared_data, tmp_path, capsys):
    """The command line's `cli(argv)` in this process (what `python -m instructkit.dpo_train`
    calls; the Ctrl-C tests below start that for real)."""
    out_dir = tmp_path / "out"
    code = dpo_cli.cli(cli_args(sft_file, shared_data, "--output-dir", str(out_dir)))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"^Ep 1 \(Step 000000\): Train loss 0\.6\d\d, Val loss 0\.693, "
                     r"Train reward margins 0\.\d\d\d, Val reward margins", out, re.M)
    assert "Preference data: 10 train, 10 validation, 10 test entries" in out

    sft = torch.load(sft_file, weights_only=True)
    tuned = torch.load(out_dir / "tiny-sft-dpo.pth", weights_only=True)
    GPTModel(TEST_MODE_CONFIG).load_state_dict(tuned)  # strict: the whole model
    assert not torch.equal(sft["out_head.weight"], tuned["out_head.weight"])

    rows = read_metrics(out_dir / "tiny-sft-dpo.metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1]  # 2 steps, evaluated after each
    record = json.loads((out_dir / "tiny-sft-dpo.run.json").read_text())
    assert record["model_config"] == TEST_MODE_CONFIG and record["config"]["beta"] == 0.1
    assert record["dataset"]["sha256"] == \
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
    assert record["final_losses"]["val_reward_margin"] == pytest.approx(
        rows[-1]["val_chosen_reward"] - rows[-1]["val_rejected_reward"])
    assert record["final_losses"]["train_losses"] == rows[-1]["train_loss"]
    answers = json.loads((out_dir / "tiny-sft-dpo-responses.json").read_text())
    assert len(answers) == 10 and {"sft_response", "dpo_response"} <= set(answers[0])
    assert (out_dir / "tiny-sft-dpo-plot.pdf").read_bytes().startswith(b"%PDF")
    assert not list(out_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_cli_resumes_with_the_same_result(one_thread, sft_file, shared_data, tmp_path, capsys):
    def run(out, *extra):
        args = dpo_cli.build_arg_parser().parse_args(
            cli_args(sft_file, shared_data, "--epochs", "2", "--output-dir", str(out), *extra))
        return dpo_cli.main(dpo_cli.DPOConfig(**vars(args)))

    whole = run(tmp_path / "whole")
    assert run(tmp_path / "parts", "--max-steps", "3")["tracking"] is None
    checkpoint = tmp_path / "parts" / "checkpoints" / "tiny-sft-dpo-step0000003.pth"
    assert checkpoint.exists()
    assert "Stopped after 3 steps" in capsys.readouterr().out
    # Another learning rate: the checkpoint is refused, naming the difference.
    assert dpo_cli.cli(cli_args(sft_file, shared_data, "--epochs", "2", "--output-dir",
                                str(tmp_path / "parts"), "--resume", "--lr", "2e-3")) == 2
    assert "config.lr: 0.001 in the checkpoint, 0.002 now" in capsys.readouterr().err
    parts = run(tmp_path / "parts", "--resume")
    assert f"Resuming from {checkpoint}: epoch 2, after step 3." in capsys.readouterr().out
    assert parts["tracking"] == whole["tracking"]  # 4 steps, 2 per epoch: the same numbers
    assert [r["train_loss"] for r in read_metrics(parts["paths"]["metrics"])] == \
        whole["tracking"]["train_losses"]
    a = torch.load(whole["paths"]["model"], weights_only=True)
    b = torch.load(parts["paths"]["model"], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_sigint_saves_a_checkpoint_and_resume_finishes_as_uninterrupted(
        one_thread, sft_file, shared_data, tmp_path, capsys):
    """A real Ctrl-C to `python -m instructkit.dpo_train`: it stops after the step, saves a checkpoint, says
    how to resume, and the resumed run ends with the weights of an uninterrupted one."""
    extra = ("--epochs", "10", "--save-every", "100")  # 20 steps; no checkpoint but Ctrl-C's
    whole_args = dpo_cli.build_arg_parser().parse_args(
        cli_args(sft_file, shared_data, *extra, "--output-dir", str(tmp_path / "whole")))
    whole = dpo_cli.main(dpo_cli.DPOConfig(**vars(whole_args)))

    out = tmp_path / "parts"
    command = [sys.executable, "-u", "-m", "instructkit.dpo_train",
               *cli_args(sft_file, shared_data, *extra, "--output-dir", str(out))]
    code, stderr = run_and_act(command, tmp_path / "stderr", ["Ep 1 (Step 000001)"],
                               send_interrupt, timeout=120,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 130, stderr
    assert "Ctrl-C: stopping after this step to save a checkpoint" in stderr
    assert "Traceback" not in stderr
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert f"--resume {checkpoint}" in stderr and "The same command with --resume" in stderr
    assert 2 <= int(checkpoint.stem.rsplit("step", 1)[1]) < 20
    assert not (out / "tiny-sft-dpo.pth").exists()  # training did not finish

    assert dpo_cli.cli(cli_args(sft_file, shared_data, *extra, "--output-dir", str(out),
                                "--resume")) == 0
    assert f"Resuming from {checkpoint}" in capsys.readouterr().out
    a = torch.load(whole["paths"]["model"], weights_only=True)
    b = torch.load(out / "tiny-sft-dpo.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in read_metrics(out / "tiny-sft-dpo.metrics.jsonl")] == \
        whole["tracking"]["train_losses"]


def test_cli_bad_inputs_exit_2_without_a_traceback(sft_file, shared_data, tmp_path, capsys):
    assert dpo_cli.cli(["--sft-model", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nope.pth does not exist" in err
    assert "gpt_instruction_finetuning.py" in err

    run_record = sft_file.with_name("tiny-sft.run.json")
    write_json(run_record, {"model_config": {**TEST_MODE_CONFIG, "n_layers": 3}})
    assert dpo_cli.cli(cli_args(sft_file, shared_data)) == 2
    err = capsys.readouterr().err
    assert "tiny-sft.pth does not fit a GPTModel with emb_dim 64, 3 layers" in err
    assert "missing: trf_blocks.2.att.W_query.weight" in err and "run record" in err
    write_json(run_record, {"model_config": {**TEST_MODE_CONFIG, "emb_dim": 128}})
    assert dpo_cli.cli(cli_args(sft_file, shared_data)) == 2
    assert "wrong shape: tok_emb.weight (50257, 64) (the model has (50257, 128))" in \
        capsys.readouterr().err

    write_json(run_record, {"model_config": TEST_MODE_CONFIG})

    assert dpo_cli.cli(cli_args(sft_file, shared_data, "--resume", "--output-dir",
                                str(tmp_path / "fresh"))) == 2
    assert "No checkpoint named tiny-sft-dpo-step*.pth" in capsys.readouterr().err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "chosen": "c"}]))
    assert dpo_cli.cli(cli_args(sft_file, shared_data, "--data", str(bad))) == 2
    assert "entry 0 has no 'rejected' key" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_tiny_run_agrees_and_prints_ratios(shared_data):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dpo.py"), "--tiny", "--device", "cpu",
         "--data", str(shared_data / "instruction-data-with-preference.json"),
         "--tokenizer-dir", str(shared_data / "gpt2-tokenizer")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.count(": OK") == 2 and "FAILED" not in out
    assert re.search(r"^reference cache: 2 entries in [\d.]+ s", out, re.M)
    for variant in ("fast", "cached"):
        for metric in ("training step", "evaluation batch", "book loop"):
            match = re.search(rf"^RATIO tiny {variant} {metric}: (\d+\.\d\d)x", out, re.M)
            assert match and float(match[1]) > 0, (variant, metric)


@pytest.mark.slow
def test_cli_second_ctrl_c_while_a_checkpoint_is_written_names_the_latest_checkpoint(
        sft_file, shared_data, tmp_path):
    """Two real Ctrl-Cs while a --save-every checkpoint is written: that checkpoint is lost,
    and the message names the one saved before it and the --resume that continues it."""
    out, stderr = tmp_path / "out", tmp_path / "stderr"
    checkpoints = out / "checkpoints"

    command = [sys.executable, "-u", "-m", "instructkit.dpo_train",
               *cli_args(sft_file, shared_data, "--epochs", "1000", "--save-every", "1",
                         "--output-dir", str(out))]
    code, err = run_and_act(command, stderr, ["Ep 1 (Step 000000)"],
                            twice_during_a_checkpoint_write(checkpoints, stderr),
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    step, newest = checkpoint_cut_by_a_second_ctrl_c(code, err, checkpoints)
    assert err.strip().splitlines()[-1] == (
        f"Interrupted. Training stopped during the write of the checkpoint of step {step + 1}, "
        f"which was not saved; the latest checkpoint is the one of step {step}, {newest}. Resume "
        f"from it: --resume {newest} on the command line, or TrainingRun.resume({str(newest)!r}).")
