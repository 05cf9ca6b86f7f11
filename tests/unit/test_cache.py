from __future__ import annotations

from rkbench.cache import StageCache, sha256_file, stage_key


def test_key_depends_on_every_part():
    base = stage_key("convert", onnx="a", opts={"algo": "normal"}, toolkit="2.5.0")
    assert base == stage_key("convert", toolkit="2.5.0", opts={"algo": "normal"}, onnx="a")
    assert base != stage_key("convert", onnx="a", opts={"algo": "mmse"}, toolkit="2.5.0")
    assert base != stage_key("convert", onnx="a", opts={"algo": "normal"}, toolkit="2.4.0")
    assert base != stage_key("export", onnx="a", opts={"algo": "normal"}, toolkit="2.5.0")


def test_miss_then_commit_then_hit(tmp_path):
    cache = StageCache(tmp_path)
    key = stage_key("export", x=1)
    entry = cache.lookup("export", key)
    assert not entry.hit
    work = cache.begin(entry)
    (work / "model.onnx").write_bytes(b"graph")
    cache.commit(entry, {"onnx": "model.onnx"}, {"head": "rknn"})
    again = cache.lookup("export", key)
    assert again.hit and again.meta["info"] == {"head": "rknn"}
    assert again.meta["outputs"]["onnx"]["sha256"] == sha256_file(work / "model.onnx")
    assert cache.hits == ["export"] and cache.misses == ["export"]


def test_half_written_entry_is_not_trusted(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.lookup("convert", stage_key("convert", x=2))
    work = cache.begin(entry)
    (work / "model.rknn").write_bytes(b"partial")   # killed before commit: no meta.json
    assert not cache.lookup("convert", entry.key).hit
    assert not (cache.begin(entry) / "model.rknn").exists()   # a new attempt starts clean
