"""safe_files: whole files or none, the usual file mode, and a clear error on a full disk."""

import errno
import os
import stat

import pytest
import torch
from portable import import_or_skip, posix_only
from small_disk import small_tmpfs

from instructkit.safe_files import (
    DiskFullError,
    ask_at_terminal,
    retry_while_disk_full,
    save_figure,
    save_state_dict,
    write_atomically,
    write_json,
)


@pytest.fixture
def umask():
    """Set the process umask for a test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def small_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    plt.close(fig)
    return fig


@posix_only
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_usual_mode(tmp_path, umask, mask, expected):
    umask(mask)
    write_json(tmp_path / "a.json", {"a": 1})
    save_state_dict({"w": torch.ones(3)}, tmp_path / "m.pth")
    save_figure(small_figure(), tmp_path / "plot.pdf")
    write_atomically(tmp_path / "t.txt", lambda tmp: open(tmp, "w").close())
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "a.json": expected, "m.pth": expected, "plot.pdf": expected, "t.txt": expected}
    # As a plain open() would create it:
    (tmp_path / "plain").touch()
    assert mode(tmp_path / "plain") == expected


def test_save_figure_format_follows_the_extension(tmp_path):
    fig = small_figure()
    save_figure(fig, tmp_path / "plot.pdf")
    save_figure(fig, tmp_path / "plot.png", dpi=50)
    assert (tmp_path / "plot.pdf").read_bytes().startswith(b"%PDF")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.pdf", "plot.png"]


def test_save_figure_failing_halfway_keeps_the_old_plot(tmp_path):
    path = tmp_path / "plot.pdf"
    path.write_bytes(b"old plot")
    with pytest.raises(ValueError, match="not supported"):
        save_figure(small_figure(), path, format="no-such-format")
    assert path.read_bytes() == b"old plot"
    assert list(tmp_path.iterdir()) == [path]


def test_enospc_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"old": True})

    def fill_the_disk(tmp):
        with open(tmp, "w") as f:
            f.write("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError) as err:
        write_atomically(path, fill_the_disk)
    assert str(err.value) == (f"no space left on the disk while writing {path} (the old file is "
                              f"unchanged): free some space and run again")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert path.read_text() == '{\n    "old": true\n}'
    assert list(tmp_path.iterdir()) == [path]

    with pytest.raises(DiskFullError, match=r"new.json \(nothing was written\)"):
        write_atomically(tmp_path / "new.json", fill_the_disk)
    assert list(tmp_path.iterdir()) == [path]


def test_other_errors_are_not_disk_full(tmp_path):
    def fail(tmp):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error") as err:
        write_atomically(tmp_path / "x", fail)
    assert not isinstance(err.value, DiskFullError)
    assert list(tmp_path.iterdir()) == []


def test_torch_save_on_a_real_full_disk_keeps_the_old_model(tmp_path):
    """torch.save's own error is 'enforce fail at inline_container.cc'; ours names the file."""
    with small_tmpfs(tmp_path / "disk", size="512k") as disk:
        path = disk / "model.pth"
        save_state_dict({"w": torch.ones(10)}, path)
        old = path.read_bytes()
        with pytest.raises(DiskFullError, match=r"model.pth \(the old file is unchanged\)"):
            save_state_dict({"w": torch.ones(1_000_000)}, path)  # 4 MB into 512 KiB
        assert path.read_bytes() == old
        assert torch.load(path, weights_only=True)["w"].tolist() == [1.0] * 10
        assert list(disk.iterdir()) == [path]


def test_without_a_terminal_a_full_disk_fails_at_once(tmp_path):
    with open(tmp_path / "input", "w+") as not_a_terminal:
        assert ask_at_terminal("The model", stdin=not_a_terminal) is None
    with small_tmpfs(tmp_path / "disk", size="512k") as disk:
        with pytest.raises(DiskFullError, match="nothing was written"):
            retry_while_disk_full(lambda: save_state_dict({"w": torch.ones(1_000_000)},
                                                          disk / "model.pth"), None)
        assert list(disk.iterdir()) == []


def test_at_a_terminal_a_full_disk_waits_for_enter_and_ctrl_d_gives_up(tmp_path):
    """A real pty: the first Enter retries (the disk is still full), Ctrl-D then gives up."""
    pty = import_or_skip("pty")
    terminal, user_side = pty.openpty()
    try:
        os.write(terminal, b"\n\x04")  # what the user types: Enter, then Ctrl-D
        with open(user_side, closefd=False) as stdin, open(tmp_path / "err", "w+") as stderr:
            wait_for_space = ask_at_terminal("The model", stdin=stdin, stderr=stderr)
            with small_tmpfs(tmp_path / "disk", size="512k") as disk:
                with pytest.raises(DiskFullError, match="model.pth"):
                    retry_while_disk_full(lambda: save_state_dict(
                        {"w": torch.ones(1_000_000)}, disk / "model.pth"), wait_for_space)
                assert list(disk.iterdir()) == []
            stderr.seek(0)
            told = stderr.read()
    finally:
        os.close(terminal)
        os.close(user_side)
    assert told.count("The model is still in memory: free some space on that disk, then press "
                      "Enter to write it again (Ctrl-D or Ctrl-C gives up).") == 2
