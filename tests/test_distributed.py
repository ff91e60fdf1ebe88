"""distributed.py: two real processes under torchrun (gloo, CPU) give one process's numbers.

tests/ddp_script.py trains a tiny GPT for 3 steps on rows of lengths 2 to 24, so the two
processes' token counts differ in every batch, then evaluates and generates. It runs once
under `torchrun --nproc_per_node=2` and once under plain python (no torchrun: the single
process path), side by side, and the tests compare what they wrote.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_in_process import run_finetune
from conftest import ROOT, SHARED_DATA, TOKENIZER_DIR
from loopback_server import free_port
from portable import TORCHRUN_ENV, WINDOWS, new_group_kwargs, send_interrupt

from instructkit.distributed import (
    DistributedError,
    ProcessGroup,
    SingleProcess,
    init_processes,
    process_group_backend,
    torchrun_env,
)

SCRIPT = Path(__file__).resolve().parent / "ddp_script.py"
STRATEGIES = ("ddp", "fsdp")


def script_command(out_dir, *args, nproc=None):
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                          "--standalone"]
    return [sys.executable, *launcher, str(SCRIPT), str(out_dir), *args]


def start(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **TORCHRUN_ENV}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def run_side_by_side(commands):
    """Run {key: (out_dir, command)} at the same time; {key: result.json's dict, with "dir"}."""
    processes = {key: start(command) for key, (_, command) in commands.items()}
    for process in processes.values():
        finish(process)
    return {key: {"dir": out_dir, **json.loads((out_dir / "result.json").read_text())}
            for key, (out_dir, _) in commands.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{1: results of one process, 2: results of two}: DDP, FSDP, and TrainingRun to the end;
    the two processes also stop a TrainingRun after 2 steps with a checkpoint."""
    dirs = {n: tmp_path_factory.mktemp(f"nproc{n}") for n in (1, 2)}
    args = ("--strategies", ",".join(STRATEGIES))
    return run_side_by_side({
        1: (dirs[1], script_command(dirs[1], *args, "--trainer", "full")),
        2: (dirs[2], script_command(dirs[2], *args, "--trainer", "full,stop,fsdp-full,fsdp-stop",
                                    nproc=2))})


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """The checkpoint the two processes stopped with, resumed by 1 and by 2 processes."""
    commands = {}
    for n in (1, 2):
        out_dir = tmp_path_factory.mktemp(f"resumed{n}")
        shutil.copytree(runs[2]["dir"] / "checkpoints", out_dir / "checkpoints")
        commands[n] = (out_dir, script_command(out_dir, "--trainer", "resume,fsdp-resume",
                                               nproc=2 if n == 2 else None))
    return run_side_by_side(commands)


# FSDP computes the loss through the book's GPTModel.forward (explicit attention, LayerNorm
# from mean and variance), one process through fast_gpt's fused kernels: gradients differ in
# their last bits, and AdamW (lr 1e-2 here) scales a near-zero gradient's noise up to a step.
ATOL = {"ddp": 1e-6, "fsdp": 1e-5}


def assert_same_weights(path, reference, strategy="ddp"):
    weights, expected = torch.load(path, weights_only=True), torch.load(reference, weights_only=True)
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=ATOL[strategy])


@pytest.mark.slow
def test_two_processes_ran(runs):
    assert runs[1]["world_size"] == 1
    assert runs[2]["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_losses_per_step_equal_one_process(runs, strategy):
    one, two = runs[1][strategy]["losses"], runs[2][strategy]["losses"]
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-6)


@pytest.mark.slow
def test_token_weighting_is_what_makes_them_equal(runs):
    """The mean of the two processes' own mean losses (what plain averaging optimises) is not
    the global batch's loss here: the rows' token counts differ between the processes."""
    one, two = runs[1]["ddp"], runs[2]["ddp"]
    assert one["naive_losses"] == one["losses"]  # one process: one mean
    for naive, weighted in zip(two["naive_losses"], two["losses"], strict=True):
        assert abs(naive - weighted) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_final_weights_equal_one_process(runs, strategy):
    assert_same_weights(runs[2]["dir"] / f"{strategy}.pth", runs[1]["dir"] / f"{strategy}.pth", strategy)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_evaluation_losses_equal_one_process(runs, strategy):
    """Batches of 3, 3 and 1 rows over 2 processes: shares of 2 and 1 rows, and one empty."""
    assert runs[2][strategy]["eval_losses"] == pytest.approx(runs[1][strategy]["eval_losses"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_answers_gathered_in_order(runs, strategy):
    answers = runs[2][strategy]["answers"]
    assert answers == runs[1][strategy]["answers"]
    assert len(answers) == 5 and len({tuple(a) for a in answers}) > 1  # not all alike


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_run_equals_one_process(runs, strategy):
    """training.TrainingRun under torchrun: the printed losses, tokens seen (the
    global batch's padded size) and final weights of one process."""
    name = "trainer_full" if strategy == "ddp" else "trainer_fsdp_full"
    one, two = runs[1]["trainer_full"], runs[2][name]
    assert one["steps"] == two["steps"] == 6
    assert two["tokens_seen"] == one["tokens_seen"]
    for key in ("train_losses", "val_losses"):
        assert len(one[key]) == 3 and two[key] == pytest.approx(one[key], rel=1e-6)
    assert_same_weights(runs[2]["dir"] / f"{name}.pth", runs[1]["dir"] / "trainer_full.pth", strategy)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("nproc", [1, 2])
def test_stopped_under_two_processes_resumes_under(resumed, runs, nproc, strategy):
    """Stopped after 2 of 6 steps by 2 processes (FSDP: a checkpoint gathered from the
    shards), resumed by 1 or 2: the uninterrupted run's losses and weights."""
    name = "trainer_resume" if strategy == "ddp" else "trainer_fsdp_resume"
    assert runs[2][name.replace("resume", "stop")]["steps"] == 2
    full, result = runs[1]["trainer_full"], resumed[nproc][name]
    assert result["steps"] == 6 and result["tokens_seen"] == full["tokens_seen"]
    for key in ("train_losses", "val_losses"):
        assert result[key] == pytest.approx(full[key], rel=1e-6)
    assert_same_weights(resumed[nproc]["dir"] / f"{name}.pth", runs[1]["dir"] / "trainer_full.pth",
                        strategy)


@pytest.mark.slow
def test_two_machines_through_the_c10d_rendezvous(runs, tmp_path):
    """`--nnodes 2 --rdzv-backend c10d`, as on two machines: here two torchrun agents of one
    process each, meeting at a rendezvous on 127.0.0.1 (each thinks it is its machine's
    LOCAL_RANK 0)."""
    port = free_port()
    launcher = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test"]
    agents = [start([sys.executable, *launcher, str(SCRIPT), str(tmp_path), "--strategies", "ddp"])
              for _ in range(2)]
    for agent in agents:
        finish(agent)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["ddp"]["losses"] == pytest.approx(runs[1]["ddp"]["losses"], rel=1e-6)
    assert result["ddp"]["answers"] == runs[1]["ddp"]["answers"]
    assert_same_weights(tmp_path / "ddp.pth", runs[1]["dir"] / "ddp.pth")


@pytest.mark.slow
def test_one_process_failing_stops_the_job_with_its_error(tmp_path):
    """Process 1 raises before step 1's backward while process 0 waits for it in the loss's
    all-reduce (whose timeout is 10 minutes): torchrun ends both, at once, with the error."""
    began = time.monotonic()
    process = start(script_command(tmp_path, "--strategies", "ddp", "--fail-rank", "1",
                                   "--fail-at-step", "1", nproc=2))
    output, _ = process.communicate(timeout=180)
    elapsed = time.monotonic() - began
    assert process.returncode != 0
    assert "error (process 1 of 2): process 1 failed on purpose at step 1" in output
    assert elapsed < 90, f"took {elapsed:.0f} s"
    assert not (tmp_path / "result.json").exists()


def test_batch_that_does_not_divide_is_refused():
    group = ProcessGroup(rank=1, local_rank=1, world_size=4, device="cpu")
    group.check_batch_size(8)
    with pytest.raises(DistributedError, match=r"--batch-size 6 is the global batch, shared by 4 "
                                               r"processes, and does not divide by 4: use a multiple "
                                               r"of 4 \(e.g. 4\)"):
        group.check_batch_size(6)
    SingleProcess().check_batch_size(7)


def test_share_takes_every_world_size_th_row():
    group = ProcessGroup(rank=1, local_rank=0, world_size=3, device="cpu")
    assert group.share([10, 11, 12, 13, 14, 15, 16]) == [11, 14]
    assert group.share(torch.arange(7)).tolist() == [1, 4]
    assert not group.is_main and ProcessGroup(0, 0, 3, "cpu").is_main


def test_torchrun_environment():
    assert torchrun_env({}) is None
    assert torchrun_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 1, 4)
    with pytest.raises(DistributedError, match="start several processes with torchrun"):
        torchrun_env({"WORLD_SIZE": "4", "RANK": "x", "LOCAL_RANK": "0"})


def test_backend_is_gloo_where_nccl_is_missing():
    """Windows' PyTorch has no NCCL: CUDA processes then talk through gloo instead of failing."""
    assert process_group_backend("cuda", nccl_available=True) == "nccl"
    assert process_group_backend("cuda", nccl_available=False) == "gloo"
    assert process_group_backend("cpu", nccl_available=True) == "gloo"


def test_without_torchrun_nothing_changes():
    group = init_processes(device="cpu", environ={})
    assert type(group) is SingleProcess and group.world_size == 1 and group.is_main
    loss_sum, count = torch.tensor(6.0, requires_grad=True), torch.tensor(4)
    assert group.backward_loss(loss_sum, count).item() == 1.5
    assert group.padded_tokens(torch.zeros(3, 5)) == 15 and group.any(True) and not group.any(False)
    assert group.map_in_order(lambda items: [x * 2 for x in items], [1, 2, 3]) == [2, 4, 6]


def test_close_frees_ddp_before_the_group(monkeypatch):
    """A real gloo group of one process, here: DDP (whose reducer holds the group from C++,
    with the GIL) must be gone before the group is destroyed, so that the group's last
    reference is torch's Python handle, which lets the GIL go while gloo's threads stop. The
    other order hung a torchrun process at exit now and then (ProcessGroup.close)."""
    import weakref

    import torch.distributed as dist

    port = free_port()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    group = init_processes(device="cpu", environ=env)
    try:
        model = torch.nn.Linear(3, 2)
        group.prepare_model(model, "ddp")
        ddp = weakref.ref(group._train_forward)
        assert type(ddp()).__name__ == "DistributedDataParallel"
        seen = {}
        destroy = dist.destroy_process_group

        def recording_destroy(*args, **kwargs):
            seen["ddp alive"] = ddp() is not None
            seen["group"] = dist.group.WORLD
            destroy(*args, **kwargs)

        monkeypatch.setattr(dist, "destroy_process_group", recording_destroy)
        group.close()
        assert seen["ddp alive"] is False and seen["group"] is not None
        assert not dist.is_initialized()
        group.close()  # twice is harmless
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


#####################################
# The command line under torchrun
#####################################

CLI = ROOT / "gpt_instruction_finetuning.py"
STEM = "gpt2-medium355M-sft-test"


def cli_args(out_dir, *args):
    """The test-mode finetune (batches of 2: one row per process under 2), its losses every
    step, each over 2 batches (the evaluation's shares combined, and averaged over batches)."""
    return ["--test_mode", "--data", str(SHARED_DATA / "instruction-data.json"), "--tokenizer-dir",
            str(TOKENIZER_DIR), "--output-dir", str(out_dir), "--epochs", "2", "--eval-freq", "1",
            "--eval-iter", "2", "--max-new-tokens", "12", *args]


def cli_command(out_dir, *args, nproc=None):
    """`cli_args` under torchrun with `nproc` processes, or under plain python (nproc None)."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                          "--standalone"]
    return [sys.executable, *launcher, str(CLI), *cli_args(out_dir, *args)]


def in_this_process(out_dir, *args):
    """`cli_args` as one process, here in this one, with one thread as the subprocesses have
    (cli_in_process.py: a subprocess would spend seconds on imports alone): its output."""
    proc = run_finetune(*cli_args(out_dir, *args), one_thread=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cli_outputs(out_dir, output):
    # the processes shared process 0's lock on the output folder, released at the end
    assert not (out_dir / ".instructkit.lock").exists()
    return {"dir": out_dir, "output": output,
            "metrics": [json.loads(line) for line in (out_dir / f"{STEM}.metrics.jsonl").open()],
            "responses": json.loads((out_dir / "instruction-data-with-response-test.json").read_text()),
            "record": json.loads((out_dir / f"{STEM}.run.json").read_text())}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """One process; two (DDP, and FSDP); two stopped by --max-steps 7 (of 10), then resumed by
    one and by two. The one-process runs go in this process while torchrun's run beside them."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    dirs = {key: tmp_path_factory.mktemp(f"cli-{key}") for key in ("one", "two", "fsdp", "stopped")}
    processes = {"two": start(cli_command(dirs["two"], nproc=2)),
                 "fsdp": start(cli_command(dirs["fsdp"], "--fsdp", nproc=2)),
                 "stopped": start(cli_command(dirs["stopped"], "--max-steps", "7", nproc=2))}
    outputs = {"one": in_this_process(dirs["one"])}
    outputs.update({key: finish(process) for key, process in processes.items()})
    runs = {key: cli_outputs(dirs[key], outputs[key]) for key in ("one", "two", "fsdp")}
    runs["stopped"] = {"dir": dirs["stopped"], "output": outputs["stopped"]}
    resumed = {nproc: tmp_path_factory.mktemp(f"cli-resumed{nproc}") for nproc in (1, 2)}
    for out_dir in resumed.values():
        shutil.copytree(dirs["stopped"], out_dir, dirs_exist_ok=True)
    two = start(cli_command(resumed[2], "--resume", nproc=2))
    runs["resumed1"] = cli_outputs(resumed[1], in_this_process(resumed[1], "--resume"))
    runs["resumed2"] = cli_outputs(resumed[2], finish(two))
    return runs


def assert_same_run(run, reference, strategy="ddp"):
    """Per-step losses, tokens seen and final weights within float rounding, answers equal.

    The attention's key bias is compared more loosely: its true gradient is zero (softmax
    ignores a constant added to every key), and AdamW turns the float noise left in it, which
    depends on the summation order, into steps of up to lr (5e-5) each."""
    assert [row["step"] for row in run["metrics"]] == [row["step"] for row in reference["metrics"]]
    assert len(run["metrics"]) == 10
    for row, expected in zip(run["metrics"], reference["metrics"], strict=True):
        assert row["tokens_seen"] == expected["tokens_seen"]
        assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
        assert row["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    weights = torch.load(run["dir"] / f"{STEM}.pth", weights_only=True)
    expected = torch.load(reference["dir"] / f"{STEM}.pth", weights_only=True)
    assert weights.keys() == expected.keys()
    for name in expected:
        atol = 1e-5 if name.endswith("att.W_key.bias") else ATOL[strategy]
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=atol)
    assert run["responses"] == reference["responses"]


@pytest.mark.slow
def test_cli_under_torchrun_equals_one_process(cli_runs):
    one, two = cli_runs["one"], cli_runs["two"]
    assert_same_run(two, one)
    assert [e["instruction"] for e in two["responses"]] == [e["instruction"] for e in one["responses"]]
    assert len(two["responses"]) == 10
    assert one["record"]["processes"] == 1 and two["record"]["processes"] == 2
    assert "Processes: 2 (DDP), 1 of each batch of 2 on each" in two["output"]
    for line in ("Training set length: 10", "Ep 2 (Step 000009)", "Model saved as"):
        assert two["output"].count(line) == 1, line  # printed by process 0 only


@pytest.mark.slow
def test_cli_with_fsdp_equals_one_process(cli_runs):
    assert "Processes: 2 (FSDP), 1 of each batch of 2 on each" in cli_runs["fsdp"]["output"]
    assert_same_run(cli_runs["fsdp"], cli_runs["one"], "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_cli_stopped_under_two_processes_resumes_under(cli_runs, nproc):
    assert "Stopped after 7 steps (--max-steps)" in cli_runs["stopped"]["output"]
    assert not (cli_runs["stopped"]["dir"] / f"{STEM}.pth").exists()
    resumed = cli_runs[f"resumed{nproc}"]
    assert "Resuming from" in resumed["output"] and "after step 7" in resumed["output"]
    assert_same_run(resumed, cli_runs["one"])


@pytest.mark.slow
def test_cli_refuses_a_batch_that_does_not_divide(tmp_path, shared_data):
    process = start(cli_command(tmp_path / "out", "--batch-size", "1", nproc=2))
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert "error: --batch-size 1 is the global batch, shared by 2 processes, and does not divide by 2" \
        in output
    assert "Training set length" not in output  # refused before any work
    assert not list((tmp_path / "out").rglob("*"))  # (the settings check made the folder)


@pytest.mark.slow
@pytest.mark.skipif(WINDOWS, reason="torchrun passes on SIGINT and SIGTERM, but not Ctrl-Break "
                                     "(SIGBREAK), the one console event a test can send on Windows")
def test_cli_ctrl_c_under_torchrun_stops_every_process_at_one_checkpoint(tmp_path, shared_data):
    """Ctrl-C reaches torchrun, which passes SIGINT on to each process (at slightly different
    moments); they agree to stop after the same step, process 0 saves one checkpoint and
    says how to resume, all well before torchrun's 30 s limit."""
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        process = subprocess.Popen(cli_command(tmp_path / "out", "--epochs", "200", nproc=2), stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   **new_group_kwargs())
    deadline = time.monotonic() + 150
    while "Ep 1 (Step 000002)" not in log.read_text() and process.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    began = time.monotonic()
    send_interrupt(process)
    process.wait(timeout=60)
    elapsed = time.monotonic() - began
    text = log.read_text()
    assert process.returncode != 0
    assert elapsed < 25, f"took {elapsed:.0f} s"
    assert text.count("Training interrupted: saved a checkpoint") == 1, text  # said once, by process 0
    assert text.count("To continue, run the same command with --resume") == 1
    saved = list((tmp_path / "out" / "checkpoints").glob("*.pth"))
    assert len(saved) == 1 and f"saved a checkpoint ({saved[0]})" in text
