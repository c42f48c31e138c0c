"""The model library: entries, names that must never escape it, locking, and `hfsam models`."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from HFSAMCore.cli import models as cli_models
from HFSAMCore.errors import InputError
from HFSAMCore.runtime.progress import Progress
from HFSAMCore.store.adapters import load_adapter, save_adapter
from HFSAMCore.store.library import ModelLibrary, validate_name


def meta(name="liver5", **changes) -> dict:
    m = {
        "name": name,
        "backbone": "vit_b",
        "img_size": 512,
        "rank": 5,
        "fusion": "two_step",
        "classes": [{"value": 1, "name": "liver", "color": [221, 130, 101]}],
        "metrics": {"heldout_dice": 0.8},
    }
    m.update(changes)
    return m


def tensors(seed=0, n=64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"lora.a": torch.randn(n, 768, generator=g), "decoder.b": torch.randn(3, 5, generator=g)}


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- where the library is -------------------------------------------------------
def test_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HFSAM_HOME", str(tmp_path / "from_env"))
    assert ModelLibrary().root == (tmp_path / "from_env").resolve()
    assert ModelLibrary(tmp_path / "explicit").root == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("HFSAM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".hfsam" if os.name != "nt" else None
    if expected is not None:
        assert ModelLibrary().root == expected.resolve()
    assert not (tmp_path / "home").exists()  # reading the root creates nothing


# -- entries ---------------------------------------------------------------------
def test_list_show_import_export_remove(tmp_path):
    lib = ModelLibrary(tmp_path / "lib")
    assert lib.list_adapters() == []
    src = save_adapter(tmp_path / "liver-v1.safetensors", tensors(1), meta("liver v1"))
    # The metadata name "liver v1" is not an entry name (space): the file name is used.
    assert lib.import_adapter(src) == "liver-v1"
    lib.save_adapter(
        "spleen",
        tensors(2),
        meta("spleen", backbone="vit_l", img_size=224, classes=[{"value": 1, "name": "spleen", "color": [1, 2, 3]}]),
    )
    (lib.adapters_dir / "broken.safetensors").write_bytes(b"not an adapter")

    entries = {e["name"]: e for e in lib.list_adapters()}
    assert sorted(entries) == ["broken", "liver-v1", "spleen"]
    assert entries["liver-v1"]["backbone"] == "vit_b" and entries["liver-v1"]["img_size"] == 512
    assert entries["liver-v1"]["classes"] == ["liver"] and entries["liver-v1"]["title"] == "liver v1"
    assert entries["liver-v1"]["metrics"] == {"heldout_dice": 0.8}
    assert entries["liver-v1"]["size"] == src.stat().st_size
    assert entries["spleen"]["backbone"] == "vit_l" and entries["spleen"]["classes"] == ["spleen"]
    assert "not a readable HF-SAM adapter" in entries["broken"]["error"]

    shown = lib.show("liver-v1")
    assert shown["metadata"]["name"] == "liver v1" and len(shown["sha256"]) == 64
    with pytest.raises(InputError, match="available: broken, liver-v1, spleen"):
        lib.show("kidney")

    out = lib.export_adapter("liver-v1", tmp_path / "out.safetensors")
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        lib.export_adapter("liver-v1", out)
    folder = tmp_path / "exports"
    folder.mkdir()
    assert lib.export_adapter("spleen", folder) == folder / "spleen.safetensors"
    loaded, m = load_adapter(folder / "spleen.safetensors")
    assert torch.equal(loaded["lora.a"], tensors(2)["lora.a"]) and m["backbone"] == "vit_l"

    with pytest.raises(InputError, match="already exists"):
        lib.import_adapter(src)
    assert lib.import_adapter(src, "liver-v1", overwrite=True) == "liver-v1"
    assert lib.import_adapter(src, "copy2") == "copy2"

    lib.remove_adapter("copy2")
    assert not lib.adapter_path("copy2").exists()
    with pytest.raises(InputError, match="no adapter named 'copy2'"):
        lib.remove_adapter("copy2")
    # Only entries, no temp or lock files left behind.
    assert sorted(os.listdir(lib.adapters_dir)) == ["broken.safetensors", "liver-v1.safetensors", "spleen.safetensors"]


def test_import_refuses_non_adapters(tmp_path):
    lib = ModelLibrary(tmp_path / "lib")
    bad = tmp_path / "x.safetensors"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not a readable HF-SAM adapter"):
        lib.import_adapter(bad)
    assert not lib.adapters_dir.exists() or os.listdir(lib.adapters_dir) == []


def test_import_default_name_is_the_metadata_name(tmp_path):
    lib = ModelLibrary(tmp_path / "lib")
    src = save_adapter(tmp_path / "download (1).safetensors", tensors(), meta("kidney5"))
    assert lib.import_adapter(src) == "kidney5"


def test_resolve_adapter(tmp_path, monkeypatch):
    lib = ModelLibrary(tmp_path / "lib")
    lib.save_adapter("liver", tensors(), meta())
    assert lib.resolve_adapter("liver") == lib.adapter_path("liver")
    outside = save_adapter(tmp_path / "elsewhere.safetensors", tensors(), meta())
    assert lib.resolve_adapter(str(outside)) == outside.resolve()
    # An existing file path wins over a library name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "liver").write_bytes(outside.read_bytes())
    assert lib.resolve_adapter("liver") == (tmp_path / "liver").resolve()
    with pytest.raises(InputError, match="no adapter named 'kidney' .* available: liver"):
        lib.resolve_adapter("kidney")
    with pytest.raises(InputError, match="does not exist"):
        lib.resolve_adapter("some/dir/missing.safetensors")
    empty = ModelLibrary(tmp_path / "empty")
    with pytest.raises(InputError, match="the library is empty"):
        empty.resolve_adapter("kidney")


# -- names -----------------------------------------------------------------------
BAD_NAMES = [
    "../x",
    "..",
    "/abs",
    "/etc/passwd",
    "a/b",
    "a\\b",
    ".hidden",
    "",
    "x" * 65,
    "a..b",
    "end.",
    "with space",
    "tab\t",
    "new\nline",
    "nul\x00",
    "lіver",  # Cyrillic i
    "ｌｉｖｅｒ",
    "caf\u00e9",
    "rtl\u202eexe",
    "zero\u200bwidth",
    "CON",
    "nul.txt",
    "com1",
    None,
    5,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_bad_names_are_refused_and_nothing_escapes(tmp_path, name):
    root = tmp_path / "lib"
    lib = ModelLibrary(root)
    lib.save_adapter("ok", tensors(), meta())
    src = save_adapter(tmp_path / "src.safetensors", tensors(), meta())
    before = all_files(tmp_path)
    with pytest.raises(InputError, match="invalid library entry name"):
        validate_name(name)
    for call in (
        lambda: lib.adapter_path(name),
        lambda: lib.save_adapter(name, tensors(), meta()),
        # (name=None means "derive it", so only a given bad name must be refused)
        lambda: lib.import_adapter(src, name if name is not None else "../x"),
        lambda: lib.export_adapter(name, tmp_path / "out.safetensors"),
        lambda: lib.remove_adapter(name),
        lambda: lib.show(name),
    ):
        with pytest.raises(InputError):
            call()
    assert all_files(tmp_path) == before


@pytest.mark.parametrize("name", ["a", "liver5", "Liver_v2.1", "x" * 64, "-dash", "2025-05-01.ct"])
def test_good_names(name, tmp_path):
    assert validate_name(name) == name
    lib = ModelLibrary(tmp_path)
    assert lib.adapter_path(name).parent == lib.adapters_dir


# -- locking ---------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from HFSAMCore.store.locks import entry_lock
    with entry_lock(Path(sys.argv[1]), sys.argv[2]):
        print("holding", flush=True)
        time.sleep(120)
""")


def test_a_held_lock_blocks_and_a_killed_holder_leaves_no_lock(tmp_path, python_exe, repo_root):
    lib = ModelLibrary(tmp_path / "lib")
    lib.adapters_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [python_exe, "-c", HOLDER, str(lib.adapters_dir), "liver"], cwd=repo_root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(InputError, match="library entry 'liver' is being written by another process"):
            lib.save_adapter("liver", tensors(), meta())
        assert not lib.adapter_path("liver").exists()
    finally:
        holder.kill()
        holder.wait()
    lock = lib.adapters_dir / ".liver.lock"
    assert lock.exists()  # a killed writer cannot clean up, but its OS lock died with it
    lib.save_adapter("liver", tensors(), meta())
    assert load_adapter(lib.adapter_path("liver"))[1]["name"] == "liver5"
    assert sorted(p.name for p in lib.adapters_dir.iterdir()) == ["liver.safetensors"]  # no lock, no temp file


TRY_LOCK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from HFSAMCore.errors import InputError
    from HFSAMCore.store.locks import entry_lock
    try:
        with entry_lock(Path(sys.argv[1]), sys.argv[2]):
            print("took it")
    except InputError as exc:
        print(exc)
""")


def test_a_lock_whose_file_changed_while_it_was_taken_is_taken_again(tmp_path, monkeypatch, python_exe, repo_root):
    """A waiter that opened the lock file just before its holder removed it holds a file no longer at the path
    (and a third process may hold the one that is): it must notice, let go without removing anything, and
    lock the path anew. Simulated by making the path's file look different right after the first acquire."""
    from HFSAMCore.store import locks

    real, calls = locks._stat, []

    def stat(path):
        calls.append(path)
        return os.stat(tmp_path) if len(calls) == 2 else real(path)  # "another file" after the first try

    monkeypatch.setattr(locks, "_stat", stat)
    with locks.entry_lock(tmp_path, "x") as lock:
        assert len(calls) == 4 and lock.exists()  # two tries: the first let go, the second holds
        other = subprocess.run(
            [python_exe, "-c", TRY_LOCK, str(tmp_path), "x"], cwd=repo_root, capture_output=True, text=True, check=True
        )
        assert "library entry 'x' is being written by another process" in other.stdout  # really held
    assert not lock.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="flock is the Unix lock")
def test_a_file_system_without_flock_gets_a_lock_file_instead(tmp_path, monkeypatch):
    """Some network and FUSE mounts answer flock with ENOSYS: the lock is then an exclusively created
    file (which a killed writer would leave, and the message names), never an error or no lock at all."""
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    from HFSAMCore.store.locks import entry_lock

    with entry_lock(tmp_path, "x") as lock:
        assert lock.exists()
        monkeypatch.setattr("HFSAMCore.store.locks._HELD", set())  # as if another process asked
        with pytest.raises(InputError, match=r"being written by another process.*delete .*\.x\.lock"):
            with entry_lock(tmp_path, "x"):
                pass
    assert not lock.exists()


WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from HFSAMCore.store.library import ModelLibrary
    from HFSAMCore.errors import InputError
    root, seed, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    g = torch.Generator().manual_seed(seed)
    tensors = {"lora.a": torch.randn(1024, 1024, generator=g), "seed": torch.tensor([seed])}
    meta = {"name": f"writer{seed}", "backbone": "vit_b", "img_size": 512, "rank": 5, "fusion": "two_step",
            "classes": [{"value": 1, "name": "liver", "color": [1, 2, 3]}]}
    while not go.exists():
        time.sleep(0.005)
    try:
        ModelLibrary(root).save_adapter("shared", tensors, meta)
    except InputError as exc:
        print("LOST", exc)
        sys.exit(2)
    print("WON", seed)
""")


def test_two_processes_saving_the_same_entry(tmp_path, python_exe, repo_root):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    go = tmp_path / "go"
    root = tmp_path / "lib"
    procs = [
        subprocess.Popen(
            [python_exe, str(script), str(root), str(seed), str(go)],
            cwd=repo_root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    time.sleep(0.5)  # let both import torch; correctness does not depend on this
    go.touch()
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = next(int(out.split()[1]) for code, out, _ in results if code == 0)
    loser = next(out for code, out, _ in results if code == 2)
    assert "being written by another process" in loser or "already exists" in loser
    loaded, m = load_adapter(ModelLibrary(root).adapter_path("shared"))
    assert m["name"] == f"writer{winner}" and int(loaded["seed"]) == winner
    g = torch.Generator().manual_seed(winner)
    assert torch.equal(loaded["lora.a"], torch.randn(1024, 1024, generator=g))
    assert sorted(os.listdir(root / "adapters")) == ["shared.safetensors"]


# -- checkpoints ---------------------------------------------------------------------
def test_checkpoint_path(tmp_path):
    catalog = {
        "checkpoints": {"vit_b": {"filename": "b.pth", "url": "http://127.0.0.1/b.pth", "sha256": "0" * 64, "size": 10}}
    }
    lib = ModelLibrary(tmp_path)
    assert lib.checkpoint_path("vit_b", catalog) is None
    assert lib.checkpoint_path("tiny", catalog) is None
    lib.checkpoints_dir.mkdir()
    (lib.checkpoints_dir / "b.pth").write_bytes(b"x" * 9)  # damaged: wrong size
    assert lib.checkpoint_path("vit_b", catalog) is None
    (lib.checkpoints_dir / "b.pth").write_bytes(b"x" * 10)
    assert lib.checkpoint_path("vit_b", catalog) == lib.checkpoints_dir / "b.pth"


# -- `hfsam models` ------------------------------------------------------------------
def run_cli(*argv) -> str:
    parser = argparse.ArgumentParser(prog="hfsam")
    cli_models.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    assert args.func(args, Progress("none", out=out, err=io.StringIO())) == 0
    return out.getvalue()


def test_models_cli(tmp_path):
    lib = str(tmp_path / "lib")
    src = save_adapter(tmp_path / "liver5.safetensors", tensors(), meta())
    assert run_cli("models", "path", "--library", lib).strip() == str(Path(lib).resolve())
    assert "imported" in run_cli("models", "import", str(src), "--library", lib)
    listed = json.loads(run_cli("models", "list", "--json", "--library", lib))
    assert [(e["name"], e["backbone"], e["classes"]) for e in listed] == [("liver5", "vit_b", ["liver"])]
    table = run_cli("models", "list", "--library", lib)
    assert "liver5" in table and "vit_b: missing (hfsam models download vit_b)" in table
    shown = json.loads(run_cli("models", "show", "liver5", "--json", "--library", lib))
    assert shown["metadata"]["rank"] == 5
    # the free-text description may hold anything printable or not: shown on one line, escapes not obeyed
    odd = save_adapter(tmp_path / "odd.safetensors", tensors(), meta(name="odd", description="hi\x1b[2J\nsecond"))
    run_cli("models", "import", str(odd), "--library", lib)
    described = [ln for ln in run_cli("models", "show", "odd", "--library", lib).splitlines() if "description" in ln]
    assert described == ["  description hi\\x1b[2J\\nsecond"]
    run_cli("models", "remove", "odd", "--library", lib)
    run_cli("models", "export", "liver5", str(tmp_path / "back.safetensors"), "--library", lib)
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    run_cli("models", "remove", "liver5", "--library", lib)
    assert json.loads(run_cli("models", "list", "--json", "--library", lib)) == []
    with pytest.raises(InputError, match="no adapter named"):
        run_cli("models", "remove", "liver5", "--library", lib)
    # In the JSON progress protocol the payload is the result event.
    parser = argparse.ArgumentParser(prog="hfsam")
    cli_models.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "path", "--library", lib])
    out = io.StringIO()
    args.func(args, Progress("json", out=out, err=io.StringIO()))
    assert json.loads(out.getvalue()) == {"event": "result", "path": str(Path(lib).resolve())}


def test_models_cli_as_a_child_process(tmp_path, python_exe, repo_root):
    src = save_adapter(tmp_path / "liver5.safetensors", tensors(), meta())
    lib = str(tmp_path / "lib")

    def run(*a):
        return subprocess.run(
            [python_exe, "-m", "HFSAMCore", "models", *a, "--library", lib],
            cwd=repo_root,
            capture_output=True,
            text=True,
        )

    assert run("import", str(src)).returncode == 0
    listed = run("list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["name"] == "liver5"
    bad = run("show", "../etc")
    assert bad.returncode == 2 and "invalid library entry name" in bad.stderr
