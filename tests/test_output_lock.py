"""One run per output folder, and no orphans, no clobbering (issue 24, items 2 and 5).

The finetuning command (test mode), run to its end in this process or, where another process
is the point, in a real subprocess: two concurrent runs into one --output-dir, a stale lock
taken over, a write killed halfway and the next start, --keep beside another run's
checkpoints, bare --resume against the files' times, a run that dies before its model is
saved. Then output_lock.py's and checkpoints.py's pieces on their own.
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from cli_in_process import run_finetune
from conftest import ROOT, TOKENIZER_DIR
from interrupting import run_and_act

from instructkit import output_lock
from instructkit.checkpoints import (
    FORMAT,
    VERSION,
    checkpoint_path,
    list_checkpoints,
    newest_checkpoint,
    prune_checkpoints,
)
from instructkit.errors import CheckpointError
from instructkit.output_lock import (
    LOCK_NAME,
    OutputFolderInUse,
    OutputLock,
    hold_output_folder,
    process_alive,
)
from instructkit.run_record import partial_metrics_path, publish_metrics, read_metrics
from instructkit.safe_files import leftover_temporaries, write_atomically

SCRIPT = ROOT / "gpt_instruction_finetuning.py"
STEM = "gpt2-medium355M-sft-data-test"
CHECKPOINT_STEM = STEM


def command(data, output_dir, *args):
    """The finetuning command in test mode: 5 steps an epoch, one short answer."""
    return [sys.executable, "-u", str(SCRIPT), "--test_mode", "--data", str(data),
            "--output-dir", str(output_dir), "--tokenizer-dir", str(TOKENIZER_DIR),
            "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "4",
            "--max-test-answers", "1", *args]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd):
    """`cmd` (a `command(...)`) run to its end in this process, with one torch thread
    (cli_in_process.py: a subprocess would spend seconds on imports alone). The runs that must
    be other processes (one holding the folder, one killed) start `command(...)` themselves."""
    return run_finetune(*cmd[3:], one_thread=True)  # after python, -u and the script


def dead_pid():
    """The pid of a process that has ended (and been waited for)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def write_lock(folder, pid, host, started=None):
    started = time.time() - 60 if started is None else started
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": started, "since": "then",
                                "command": "an earlier run", "token": "0" * 16}), encoding="utf-8")
    return path


#####################################
# A download that waits: a run that holds its folder for as long as the test wants
#####################################

class StallingServer(ThreadingHTTPServer):
    """Serves `body` for any path; the first byte at once, the rest once `go` is set (a byte
    every 5 s meanwhile, so the client's 30 s read timeout never fires)."""

    daemon_threads = True

    def __init__(self, body):
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.body, self.go, self.requested, self.requests = body, threading.Event(), threading.Event(), []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _StallingHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server, body = self.server, self.server.body
        server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = 1
        self.wfile.write(body[:1])
        self.wfile.flush()
        server.requested.set()
        while not server.go.wait(5) and sent < len(body) - 1:
            self.wfile.write(body[sent:sent + 1])
            self.wfile.flush()
            sent += 1
        self.wfile.write(body[sent:])

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def stalling_server(body):
    httpd = StallingServer(body)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.go.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_completes(instruction_data,
                                                                              tmp_path):
    out, data = tmp_path / "out", tmp_path / "data.json"  # downloaded by the first run
    body = json.dumps(instruction_data[:40]).encode()
    with stalling_server(body) as server, open(tmp_path / "first.out", "w") as first_out, \
            open(tmp_path / "first.err", "w") as first_err:
        cmd = command(data, out, "--data-url", f"{server.url}/data.json", "--epochs", "1")
        first = subprocess.Popen(cmd, stdout=first_out, stderr=first_err, env=env(),
                                 stdin=subprocess.DEVNULL)
        try:
            # the first run holds the folder and is downloading its data
            assert server.requested.wait(120), (tmp_path / "first.err").read_text()
            holder = json.loads((out / LOCK_NAME).read_text())
            assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
            # a killed write's leftover: only the run that holds the lock may remove it
            leftover = out / "checkpoints" / f".{STEM}-step0000009.pth.{'ab' * 8}.tmp"
            leftover.parent.mkdir()
            leftover.write_bytes(b"x" * 1000)
            before = sorted(p.name for p in out.rglob("*"))

            second = run(cmd)
            assert second.returncode == 2, second.stderr
            assert second.stdout == ""
            assert re.fullmatch(
                rf"error: --output-dir {re.escape(str(out))} is in use by another run \(pid "
                rf"{first.pid} on host {re.escape(socket.gethostname())}, since "
                rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it to end, or choose another "
                rf"--output-dir\n", second.stderr), second.stderr
            assert server.requests == ["/data.json"]  # refused before its download
            assert sorted(p.name for p in out.rglob("*")) == before and leftover.exists()
            assert first.poll() is None  # untouched: still waiting for its data
        finally:
            server.go.set()
            code = first.wait(timeout=300)
    assert code == 0, (tmp_path / "first.err").read_text()
    assert sorted(p.name for p in out.iterdir()) == [  # and the lock is gone
        "checkpoints", "gpt2-medium355M-sft-data-test.metrics.jsonl",
        "gpt2-medium355M-sft-data-test.pth", "gpt2-medium355M-sft-data-test.run.json",
        "instruction-data-with-response-data-test.json", "loss-plot-data-test.pdf"]
    assert [row["step"] for row in read_metrics(out / f"{STEM}.metrics.jsonl")] == [0, 2, 4]


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_another_hosts_lock_refused(data_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = write_lock(out, 4242, "another-machine")
    refused = run(command(data_file, out, "--epochs", "1"))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        f"error: --output-dir {out} is in use by a run on another machine (pid 4242 on host "
        f"another-machine, since {output_lock._since(json.loads(lock.read_text())['started'])}); "
        f"if that run has ended, delete {lock} and run again, or choose another --output-dir\n")
    assert json.loads(lock.read_text())["host"] == "another-machine"  # left as it was

    pid = dead_pid()
    write_lock(out, pid, socket.gethostname())
    taken = run(command(data_file, out, "--epochs", "1"))
    assert taken.returncode == 0, taken.stderr
    assert f"Note: took over the lock {lock}: process {pid} (pid {pid} on host " in taken.stdout
    assert "is no longer running." in taken.stdout
    assert not lock.exists()  # released at the end
    assert (out / f"{STEM}.pth").is_file()


def test_a_killed_write_leaves_a_temporary_file_that_the_next_start_removes(data_file, tmp_path):
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / f"{STEM}-step0000004.pth"
    writer = [sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from instructkit.safe_files import write_atomically\n"
        "def write(tmp):\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(bytes(3_000_000)); f.flush()\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(600)\n"
        "write_atomically(Path(sys.argv[1]), write)\n"), str(checkpoint)]
    code, _ = run_and_act(writer, tmp_path / "writer.err", ["writing"], lambda proc: proc.kill(),
                          timeout=60, cwd=ROOT)
    assert code != 0
    (temporary,) = leftover_temporaries(checkpoint.parent)
    assert temporary.name.startswith(f".{checkpoint.name}.") and temporary.stat().st_size == 3_000_000
    assert not checkpoint.exists()
    others = [out / "notes.tmp", out / ".x.pth.tmp", out / ".x.pth.0123.tmp",  # not our names
              out / f"..write-test-{'1' * 16}.{'2' * 16}.tmp"]  # a probe another process may write
    for path in others:
        path.write_bytes(b"keep")

    started = run(command(data_file, out, "--epochs", "1", "--max-steps", "1"))
    assert started.returncode == 0, started.stderr
    assert (f"Note: removed 1 temporary file that a killed write left behind: {temporary} "
            f"(3.0 MB).\n") in started.stdout
    assert not temporary.exists() and all(path.read_bytes() == b"keep" for path in others)


@pytest.mark.slow
def test_keep_prunes_only_this_runs_checkpoints(data_file, tmp_path):
    out = tmp_path / "out"
    other = run(command(data_file, out, "--lr", "1e-4", "--epochs", "2", "--max-steps", "6",
                        "--save-every", "6"))
    assert other.returncode == 0, other.stderr
    others = list_checkpoints(out / "checkpoints", CHECKPOINT_STEM)
    assert [p.name for p in others] == [f"{STEM}-step0000006.pth"]
    others_bytes = others[0].read_bytes()

    mine = run(command(data_file, out, "--epochs", "1", "--save-every", "1", "--keep", "1"))
    assert mine.returncode == 0, mine.stderr
    # this run's steps 1 to 4 are pruned; the other run's step 6, higher, stays as it was
    assert [p.name for p in list_checkpoints(out / "checkpoints", CHECKPOINT_STEM)] == [
        f"{STEM}-step0000005.pth", f"{STEM}-step0000006.pth"]
    assert others[0].read_bytes() == others_bytes


def other_identity_copy(path, step):
    """A copy of checkpoint `path` as step `step` of a run with another learning rate."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["identity"]["config"]["lr"] = 1.0
    copy = checkpoint_path(path.parent, CHECKPOINT_STEM, step)
    torch.save(checkpoint, copy)
    return copy


@pytest.mark.slow
def test_bare_resume_takes_the_highest_step_of_this_run_whatever_the_file_times(data_file, tmp_path):
    out = tmp_path / "out"
    stopped = run(command(data_file, out, "--epochs", "2", "--max-steps", "6", "--save-every", "2",
                          "--keep", "5"))
    assert stopped.returncode == 0, stopped.stderr
    folder = out / "checkpoints"
    two, four, six = list_checkpoints(folder, CHECKPOINT_STEM)
    another = other_identity_copy(six, 8)  # a higher step, but of another run
    another_bytes = another.read_bytes()
    now = time.time()
    for age, path in ((400, six), (300, four), (200, another), (100, two)):  # step 2 the newest
        os.utime(path, (now - age, now - age))

    resumed = run(command(data_file, out, "--epochs", "2", "--resume", "--save-every", "2",
                          "--keep", "1"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {six}: epoch 2, after step 6." in resumed.stdout
    # finished at step 10; --keep 1 kept this run's last. Its step 8 had the other run's file's
    # name: that file was moved aside, whole, before this run wrote its own
    assert [p.name for p in list_checkpoints(folder, CHECKPOINT_STEM)] == [f"{STEM}-step0000010.pth"]
    assert (folder / f"{STEM}-step0000008.pth.other-run").read_bytes() == another_bytes
    assert f"Note: {another} was a checkpoint of another run" in resumed.stdout
    rows = read_metrics(out / f"{STEM}.metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 2, 4, 6, 8]  # the rows before the resume too


@pytest.mark.slow
def test_a_run_that_dies_before_its_model_is_saved_leaves_the_earlier_metrics(data_file, tmp_path):
    out = tmp_path / "out"
    first = run(command(data_file, out, "--epochs", "1"))
    assert first.returncode == 0, first.stderr
    metrics = out / f"{STEM}.metrics.jsonl"
    earlier = metrics.read_bytes()
    record = json.loads((out / f"{STEM}.run.json").read_text())
    assert record["files"]["metrics"] == metrics.name

    code, stderr = run_and_act(command(data_file, out, "--epochs", "3", "--seed", "7"),
                               tmp_path / "second.err", ["Ep 1 (Step 000002)"],
                               lambda proc: proc.kill(), timeout=120, env=env())
    assert code != 0, stderr
    assert metrics.read_bytes() == earlier  # the saved model's metrics, whole
    partial = partial_metrics_path(metrics)
    assert [row["step"] for row in read_metrics(partial)][:2] == [0, 2]  # the dead run's own
    assert read_metrics(partial)[0] != read_metrics(metrics)[0]  # another seed: other losses


#####################################
# The pieces
#####################################

def test_one_lock_per_folder_and_its_release(tmp_path, capsys):
    with OutputLock(tmp_path) as lock:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["token"] == lock.token
        # a second lock in this process while the first is held: an earlier run of this
        # process that never released (a notebook's, ended by an error), taken over quietly
        second = OutputLock(tmp_path).acquire()
        assert second.notes == [] and json.loads((tmp_path / LOCK_NAME).read_text())["token"] == second.token
        lock.release()  # the first no longer owns the file: it leaves it
        assert (tmp_path / LOCK_NAME).exists()
        second.release()
        assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_process_holds_its_lock_and_a_dead_one_does_not(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(sleeper.pid, time.time())
        write_lock(tmp_path, sleeper.pid, socket.gethostname(), started=time.time())
        with pytest.raises(OutputFolderInUse, match=rf"in use by another run \(pid {sleeper.pid} on"):
            OutputLock(tmp_path).acquire()
        # the same pid, but the process started after the lock: a new process, the lock is stale
        write_lock(tmp_path, sleeper.pid, socket.gethostname(), started=time.time() - 3600)
        taken = OutputLock(tmp_path).acquire()
        assert "is no longer running" in taken.notes[0]
        taken.release()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not process_alive(sleeper.pid)  # waited for
    assert not process_alive(dead_pid())


def test_an_unreadable_lock_is_stale_only_once_old(tmp_path, monkeypatch):
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text("")  # a run killed between creating the file and writing it
    with pytest.raises(OutputFolderInUse, match="creating its lock"):
        OutputLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(lock_file, (old, old))
    lock = OutputLock(tmp_path).acquire()
    assert "unreadable" in lock.notes[0]
    lock.release()


def test_hold_output_folder_notes_and_removes_only_leftovers(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    leftover = tmp_path / "checkpoints" / f".run-step0000003.pth.{'c' * 16}.tmp"
    leftover.write_bytes(bytes(2500))
    write_atomically(tmp_path / "kept.json", lambda tmp: Path(tmp).write_text("{}"))
    lock = hold_output_folder(tmp_path)
    assert capsys.readouterr().out == (
        f"Note: removed 1 temporary file that a killed write left behind: {leftover} (2.5 kB).\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == [LOCK_NAME, "checkpoints", "kept.json"]
    lock.release()


def fake_checkpoint(folder, step, lr):
    path = checkpoint_path(folder, "run", step)
    torch.save({"format": FORMAT, "version": VERSION, "identity": {"config": {"lr": lr}}}, path)
    return path


def test_pruning_and_newest_by_step_and_identity(tmp_path):
    mine = {"config": {"lr": 1}}
    paths = {step: fake_checkpoint(tmp_path, step, lr) for step, lr in
             ((2, 1), (4, 1), (6, 1), (5, 2), (9, 2))}
    (tmp_path / "run-step0000007.pth").write_bytes(b"not a checkpoint")
    now = time.time()
    for step, path in paths.items():  # the lower the step, the newer the file
        os.utime(path, (now - step, now - step))

    assert newest_checkpoint(tmp_path, "run", mine) == paths[6]
    assert newest_checkpoint(tmp_path, "run") == tmp_path / "run-step0000009.pth"  # any identity
    with pytest.raises(CheckpointError, match=r"run-step0000009.pth belongs to a different run:\n"
                                              r"  config.lr: 2 in the checkpoint, 3 now"):
        newest_checkpoint(tmp_path, "run", {"config": {"lr": 3}})

    assert prune_checkpoints(tmp_path, "run", 1, mine, spare=[paths[2]]) == [paths[4]]
    assert [p.name for p in list_checkpoints(tmp_path, "run")] == [
        "run-step0000002.pth", "run-step0000005.pth", "run-step0000006.pth",
        "run-step0000007.pth", "run-step0000009.pth"]


def test_metrics_get_their_final_name_only_when_published(tmp_path):
    metrics = tmp_path / "m.metrics.jsonl"
    metrics.write_text('{"step": 0}\n')
    assert publish_metrics(metrics) is None and metrics.read_text() == '{"step": 0}\n'
    partial_metrics_path(metrics).write_text('{"step": 1}\n')
    assert partial_metrics_path(metrics).name == "m.metrics.jsonl.partial"
    assert publish_metrics(metrics) == metrics
    assert metrics.read_text() == '{"step": 1}\n' and not partial_metrics_path(metrics).exists()


def test_liveness_without_psutil(monkeypatch):
    """The fallback where psutil is missing: os.kill(pid, 0) on POSIX, OpenProcess on Windows."""
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(sleeper.pid) and process_alive(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not process_alive(sleeper.pid)
