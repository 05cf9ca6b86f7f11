"""The stage cache on real files and real processes: atomic entries, one writer per key, damaged entries
discarded with a warning, failures remembered only when deterministic."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rkbench
from rkbench import cache as cache_module
from rkbench.cache import StageCache, out_of_space, sha256_file, stage_key
from rkbench.errors import DataError, StageError

KEY = stage_key("export", x=1)
REPO = str(Path(rkbench.__file__).resolve().parents[1])


def build(cache: StageCache, key: str = KEY, content: bytes = b"graph") -> dict:
    """One stage build the way the stages do it: under open(), begin, write, commit."""
    with cache.open("export", key) as entry:
        if not entry.hit:
            (cache.begin(entry) / "model.onnx").write_bytes(content)
            cache.commit(entry, {"onnx": "model.onnx"}, {"head": "rknn"})
        return entry.meta


def stage_folder(cache: StageCache, stage: str = "export") -> list[str]:
    return sorted(p.name for p in (cache.root / stage).iterdir())


def run_python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO)  # the child imports this checkout's rkbench
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **popen)


def test_key_depends_on_every_part():
    base = stage_key("convert", onnx="a", opts={"algo": "normal"}, toolkit="2.5.0")
    assert base == stage_key("convert", toolkit="2.5.0", opts={"algo": "normal"}, onnx="a")
    assert base != stage_key("convert", onnx="a", opts={"algo": "mmse"}, toolkit="2.5.0")
    assert base != stage_key("convert", onnx="a", opts={"algo": "normal"}, toolkit="2.4.0")
    assert base != stage_key("export", onnx="a", opts={"algo": "normal"}, toolkit="2.5.0")


def test_miss_then_commit_then_hit(tmp_path):
    cache = StageCache(tmp_path)
    build(cache)
    with cache.open("export", KEY) as again:
        assert again.hit and again.meta["info"] == {"head": "rknn"}
        assert again.meta["outputs"]["onnx"]["sha256"] == sha256_file(again.dir / "model.onnx")
    assert cache.hits == ["export"] and cache.misses == ["export"]
    assert stage_folder(cache) == [KEY[:16]]   # built in a temp folder, renamed into place: nothing else


def test_entry_of_a_killed_build_is_not_trusted_and_its_temp_folder_goes(tmp_path):
    killed = run_python(
        "import os, signal, sys\nfrom pathlib import Path\nfrom rkbench.cache import StageCache\n"
        "cache = StageCache(Path(sys.argv[1]))\n"
        "with cache.open('export', sys.argv[2]) as entry:\n"
        "    (cache.begin(entry) / 'model.onnx').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n", str(tmp_path), KEY)
    assert killed.wait(timeout=120) == -9
    cache = StageCache(tmp_path)
    assert len(stage_folder(cache)) == 1 and not (tmp_path / "export" / KEY[:16]).exists()
    build(cache)
    assert cache.misses == ["export"] and stage_folder(cache) == [KEY[:16]]


def test_two_processes_build_one_key_once(tmp_path):
    code = ("import logging, sys\nfrom pathlib import Path\nfrom rkbench.cache import StageCache\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "cache = StageCache(Path(sys.argv[1]))\n"
            "with cache.open('export', sys.argv[2]) as entry:\n"
            "    if entry.hit:\n"
            "        print('hit', (entry.dir / 'model.onnx').read_text(), flush=True)\n"
            "    else:\n"
            "        (cache.begin(entry) / 'model.onnx').write_text(sys.argv[3])\n"
            "        print('building', flush=True)\n"
            "        sys.stdin.readline()  # the test says when to commit\n"
            "        cache.commit(entry, {'onnx': 'model.onnx'}, {})\n"
            "        print('built', flush=True)\n")
    first = run_python(code, str(tmp_path), KEY, "first", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert first.stdout.readline() == "building\n"          # holds the key's lock, mid-build
    second = run_python(code, str(tmp_path), KEY, "second", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in second.stderr:                               # the second one blocks on the lock ...
        if "waiting for another process building export" in line:
            break
    first.stdin.write("\n")                                  # ... until the first one commits
    first.stdin.close()
    assert first.stdout.read() == "built\n" and first.wait(timeout=120) == 0
    assert second.stdout.read() == "hit first\n" and second.wait(timeout=120) == 0
    assert stage_folder(StageCache(tmp_path)) == [KEY[:16]]


@pytest.mark.parametrize("damage", ["truncate artifact", "empty meta", "invalid meta", "missing artifact"])
def test_damaged_entry_is_a_miss_with_a_warning_and_is_replaced(tmp_path, caplog, damage):
    cache = StageCache(tmp_path)
    build(cache, content=b"a full graph")
    folder = tmp_path / "export" / KEY[:16]
    if damage == "truncate artifact":
        (folder / "model.onnx").write_bytes(b"a full")
    elif damage == "missing artifact":
        (folder / "model.onnx").unlink()
    else:
        (folder / "meta.json").write_text("" if damage == "empty meta" else '{"outputs": ')
    with caplog.at_level(logging.WARNING, logger="rkbench.cache"):
        meta = build(cache, content=b"a full graph")
    assert "discarded and rebuilt" in caplog.text
    assert cache.misses == ["export", "export"]
    assert (folder / "model.onnx").read_bytes() == b"a full graph"
    assert meta["outputs"]["onnx"]["sha256"] == sha256_file(folder / "model.onnx")
    with cache.open("export", KEY) as entry:
        assert entry.hit


@pytest.mark.parametrize("content", ["", "{not json", '{"detail": "x"}'])
def test_empty_or_invalid_failure_json_is_discarded(tmp_path, caplog, content):
    cache = StageCache(tmp_path)
    with cache.open("convert", KEY) as entry:
        cache.fail(entry, "rule X rejects the graph", "use export=rknn")
    with cache.open("convert", KEY) as entry:
        assert entry.hit and entry.failure == {"detail": "rule X rejects the graph", "hint": "use export=rknn"}
    (tmp_path / "convert" / KEY[:16] / "failure.json").write_text(content)   # e.g. written on a full disk
    with caplog.at_level(logging.WARNING, logger="rkbench.cache"), cache.open("convert", KEY) as entry:
        assert not entry.hit and entry.failure is None
        (cache.begin(entry) / "model.rknn").write_bytes(b"rknn")
        cache.commit(entry, {"rknn": "model.rknn"}, {})
    assert "is empty or invalid" in caplog.text
    assert sorted(p.name for p in (tmp_path / "convert" / KEY[:16]).iterdir()) == ["meta.json", "model.rknn"]


def test_a_failing_build_leaves_nothing_and_its_error_names_the_stage(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(DataError) as err, cache.open("export", KEY) as entry:
        (cache.begin(entry) / "model.onnx").write_bytes(b"half")
        raise DataError("x.onnx is not a YOLOv8 detector")
    assert err.value.stage == "export"            # the pipeline reports it as an export failure, not "config"
    with pytest.raises(StageError) as err, cache.open("export", KEY):
        raise StageError("simplify", "told")
    assert err.value.stage == "simplify"          # a stage given explicitly is kept
    assert stage_folder(cache) == []              # no empty or half folder left behind
    assert not cache.lookup("export", KEY).hit


def test_a_full_disk_becomes_one_error_naming_the_cache(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(StageError) as err, cache.open("convert", KEY) as entry:
        cache.begin(entry)
        raise ValueError("Traceback ...\nOSError: [Errno 28] No space left on device: '/x/model.rknn'")
    assert str(tmp_path) in str(err.value) and "cache_dir=" in err.value.hint and "\n" not in str(err.value)
    assert err.value.stage == "convert" and not err.value.deterministic
    assert stage_folder(cache, "convert") == []


def test_out_of_space_reads_the_errno_through_wrapping():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("export failed") from exc
    except RuntimeError as wrapped:
        assert out_of_space(wrapped)
    assert out_of_space(OSError(errno.EFBIG, "File too large"))
    assert not out_of_space(FileNotFoundError(errno.ENOENT, "gone")) and not out_of_space(None)


def test_commit_without_open_keeps_an_entry_committed_meanwhile(tmp_path):
    # The evaluate stage calls lookup/begin/commit without open(): the rename still happens under the lock,
    # and a good entry another process committed meanwhile (same inputs) is kept.
    ours, theirs = StageCache(tmp_path), StageCache(tmp_path)
    mine, other = ours.lookup("evaluate", KEY), theirs.lookup("evaluate", KEY)
    (ours.begin(mine) / "detections.json").write_text("[1]")
    (theirs.begin(other) / "detections.json").write_text("[2]")
    theirs.commit(other, {"detections": "detections.json"}, {})
    meta = ours.commit(mine, {"detections": "detections.json"}, {})
    assert (tmp_path / "evaluate" / KEY[:16] / "detections.json").read_text() == "[2]"
    assert meta["outputs"]["detections"]["sha256"] == sha256_file(tmp_path / "evaluate" / KEY[:16] / "detections.json")
    assert stage_folder(ours, "evaluate") == [KEY[:16]]


def test_works_without_fcntl(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "fcntl", None)   # Windows: no per-key lock, entries still atomic
    cache = StageCache(tmp_path)
    build(cache)
    assert build(cache)["info"] == {"head": "rknn"} and cache.hits == ["export"]
    assert not (tmp_path / ".locks").exists()
