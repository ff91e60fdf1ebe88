"""A few finetuning steps of a tiny GPT through distributed.py; tests/test_distributed.py runs it
under `torchrun --nproc_per_node=2` (real processes, gloo) and under plain python (one process).

    python tests/ddp_script.py OUT_DIR [--strategies ddp,fsdp] [--batch-size 4]
                               [--trainer full,stop,resume --checkpoints DIR]
                               [--fail-rank R --fail-at-step K]

Rows have very different lengths, so the processes' token counts differ in every batch. Rank 0
writes OUT_DIR/result.json: per strategy, the global batch loss of each step (`losses`), the
mean of the processes' own mean losses (`naive_losses`, what plain DDP averaging would
optimise), the evaluation losses, the generated answers (in order) and OUT_DIR/<strategy>.pth,
the final weights. `--trainer` runs training.TrainingRun the same way: to the end
("full"), stopped after 2 steps with a checkpoint ("stop"), or resumed from it ("resume").
`--fail-rank` makes that process raise before step K's backward.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from instructkit.distributed import DistributedError, processes, report_error  # noqa: E402

# No qkv bias: the key bias's true gradient is zero (softmax ignores a constant added to all
# keys), and AdamW's step turns its float noise (which differs with the summation order) into
# full-size updates, so those weights would differ between any two summation orders.
CFG = {"vocab_size": 101, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}
N_ROWS, SEED, PAD = 12, 123, 0


def make_rows():
    """N_ROWS token-id lists of lengths 2 to 24 (the shortest and longest side by side)."""
    generator = torch.Generator().manual_seed(SEED)
    lengths = [2, 24, 3, 20, 5, 17, 2, 23, 9, 4, 15, 6]
    return [torch.randint(1, CFG["vocab_size"], (n,), generator=generator).tolist() for n in lengths]


def setup(group, strategy):
    """(device, collate function, rows, model prepared for `strategy`, its AdamW)."""
    from gpt_instruction_finetuning import custom_collate_fn
    from previous_chapters import GPTModel

    device = group.device or torch.device("cpu")
    collate = partial(custom_collate_fn, pad_token_id=PAD, device=device)
    torch.manual_seed(SEED)
    model = GPTModel(CFG).to(device)
    group.prepare_model(model, strategy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return device, collate, make_rows(), model, optimizer


def train(group, strategy, batch_size, fail_rank, fail_at_step):
    from torch.utils.data import DataLoader

    from fast_gpt import generate_answer_ids
    from instructkit.training import epoch_order

    device, collate, rows, model, optimizer = setup(group, strategy)

    losses, naive_losses = [], []
    order = epoch_order(len(rows), SEED)
    model.train()
    for step, start in enumerate(range(0, len(rows), batch_size)):
        input_batch, target_batch = collate([rows[i] for i in group.share(order[start:start + batch_size])])
        optimizer.zero_grad()
        loss_sum, count = group.loss_sum_and_count(input_batch, target_batch, model, device)
        if group.rank == fail_rank and step == fail_at_step:
            raise RuntimeError(f"process {group.rank} failed on purpose at step {step}")
        group.backward_loss(loss_sum, count).backward()
        optimizer.step()
        losses.append(float(group.last_loss))
        naive_losses.append(float(group.sum_over_processes(loss_sum.detach() / count)[0]) / group.world_size)

    model.eval()
    loader = DataLoader(rows[:7], batch_size=3, collate_fn=collate)  # batches of 3, 3 and 1 rows
    with torch.inference_mode():
        eval_losses = [group.calc_loss_loader(loader, model, device),
                       group.calc_loss_loader(loader, model, device, num_batches=1)]
        prompts = [row[:5] for row in rows[:5]]
        with group.full_weights(model):
            answers = group.map_in_order(
                lambda shard: generate_answer_ids(model, shard, 6, CFG["context_length"], eos_id=PAD),
                prompts)
    state = group.full_state_dict(model)
    return {"losses": losses, "naive_losses": naive_losses, "eval_losses": eval_losses,
            "answers": answers}, state


def train_with_trainer(group, out_dir, checkpoints, scenario):
    """training.TrainingRun for 2 epochs of 3 steps: "full", "stop" (after 2 steps,
    with a checkpoint in checkpoints/ddp) or "resume" (the newest checkpoint there, to the
    end); "fsdp-full", "fsdp-stop" and "fsdp-resume" the same with FSDP (checkpoints/fsdp)."""
    from torch.utils.data import DataLoader

    from instructkit.training import CheckpointPlan, TrainingRun

    strategy, _, scenario = scenario.rpartition("-")
    strategy = strategy or "ddp"
    device, collate, rows, model, optimizer = setup(group, strategy)
    train_loader = DataLoader(rows, batch_size=4, shuffle=True, drop_last=True, collate_fn=collate)
    val_loader = DataLoader(rows[:7], batch_size=3, collate_fn=collate)
    run = TrainingRun(model, optimizer, train_loader, val_loader, device, seed=SEED,
                      checkpoints=CheckpointPlan(checkpoints / strategy, "tiny", {"model_config": CFG}),
                      distributed=group, progress=False)
    if scenario == "resume":
        run.resume()
    train_losses, val_losses, tokens_seen = run.train(num_epochs=2, eval_freq=2, eval_iter=2,
                                                      start_context=None, tokenizer=None,
                                                      max_steps=2 if scenario == "stop" else None)
    return {"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen,
            "steps": run.state.step}, group.full_state_dict(model)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--strategies", default="", help="e.g. ddp,fsdp: train() with each")
    parser.add_argument("--trainer", default="", help="e.g. full,stop: train_with_trainer() runs")
    parser.add_argument("--checkpoints", type=Path, help="the trainer's checkpoint folder "
                                                         "(default: OUT_DIR/checkpoints)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-at-step", type=int, default=0)
    args = parser.parse_args(argv)
    args.checkpoints = args.checkpoints or args.out_dir / "checkpoints"
    torch.set_num_threads(1)
    with processes(device="cpu") as group:
        try:
            group.check_batch_size(args.batch_size)
            results = {"world_size": group.world_size}
            runs = [(name, partial(train, group, name, args.batch_size, args.fail_rank,
                                   args.fail_at_step)) for name in args.strategies.split(",") if name]
            runs += [("trainer_" + name.replace("-", "_"),
                      partial(train_with_trainer, group, args.out_dir, args.checkpoints, name))
                     for name in args.trainer.split(",") if name]
            for name, run in runs:
                results[name], state = run()
                if group.is_main:
                    torch.save(state, args.out_dir / f"{name}.pth")
        except (DistributedError, RuntimeError) as e:
            report_error(group, e)
            return 2 if isinstance(e, DistributedError) else 1
        if group.is_main:
            (args.out_dir / "result.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
