"""Caches survive: a damaged cache file is rebuilt with one warning, an unwritable cache folder means no
caching (one warning), and greedy output stays exactly `ar`'s through all of it."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from casspec.api import Engine
from casspec.drafters.layer_search import LayerSetSearch
from casspec.runtime import cache_files, loading
from casspec.testing import tiny_model, tiny_tokenizer

PROMPT = "the cat sat on the mat and the cat sat on the"
NEW = 24
HIERARCHY = ("int8v", "int8", "pld")  # int8 weights, a draft vocabulary and a latency model on disk
FILES = {"quantized": "quantized/*.safetensors", "vocab": "vocab/*.pt", "latency": "latency/*.json"}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees its own first warnings (they are once per process otherwise)."""
    monkeypatch.setattr(cache_files, "_warned", set())
    monkeypatch.setattr(cache_files, "_unwritable", set())


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _engine(model, cache: Path | None, hierarchy: tuple[str, ...] = HIERARCHY) -> Engine:
    return Engine(model, tiny_tokenizer(), name="tiny-llama", hierarchy=hierarchy, cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def reference(model) -> list[int]:
    return _engine(model, None).generate(PROMPT, "ar", max_new_tokens=NEW).token_ids


@pytest.fixture(scope="module")
def filled(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("filled")
    _engine(model, cache).generate(PROMPT, "casspec", max_new_tokens=NEW)
    assert all(len(list(cache.glob(pattern))) == 1 for pattern in FILES.values())
    return cache


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "casspec.cache"]


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def _wrong_shape(kind: str, path: Path) -> None:
    if kind == "latency":  # well-formed JSON of the wrong shape, then arrays of the wrong size
        state = json.loads(path.read_text())
        plan = next(iter(state["plans"].values()))
        plan["mean"] = plan["mean"][:2]
        path.write_text(json.dumps(state))
    elif kind == "vocab":  # a tensor, but not a ranking of this vocabulary
        torch.save(torch.arange(7), path)
    else:  # a tiled tensor one tile short
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        key = next(k for k in tensors if k.endswith(".tiled"))
        tensors[key] = tensors[key][:-1].contiguous()
        save_file(tensors, str(path), metadata=meta)


def _damage(kind: str, path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes((b * 7 + 13) % 256 for b in data[:4096]))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "wrong_shape":
        _wrong_shape(kind, path)
    elif how == "old_version":
        if kind == "quantized":
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            save_file(tensors, str(path), metadata={"format": "0"})
        elif kind == "latency":
            state = json.loads(path.read_text())
            path.write_text(json.dumps({**state, "features": ["1", "n_query"]}))
        else:
            path.write_text("[1, 2, 3]")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "wrong_shape", "old_version"])
@pytest.mark.parametrize("kind", sorted(FILES))
def test_damaged_cache_file_is_rebuilt_with_one_warning(kind, how, model, reference, filled, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(filled, cache)
    (path,) = cache.glob(FILES[kind])
    _damage(kind, path, how)
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        engine = _engine(model, cache)
        for method in ("casspec", "self", "ar"):
            assert engine.generate(PROMPT, method, max_new_tokens=NEW).token_ids == reference
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(path) in warned[0] and "rebuilding" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        again = _engine(model, cache)  # the rebuilt file is read back, silently
    assert not _warnings(caplog) and all("read from cache" in what for what, _ in again.runner.build_log)
    assert not _leftovers(cache)


@pytest.mark.parametrize("how", ["folder_is_a_file", "full_disk"])
def test_unwritable_cache_means_no_caching_with_one_warning(how, model, reference, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    if how == "folder_is_a_file":  # what a read-only folder does to a non-root user: every write fails
        for folder in ("quantized", "vocab", "latency", "layer_sets"):
            (cache / folder).write_text("not a folder")
    else:
        def full(src, dst):  # noqa: ANN001, ANN202 - os.replace's signature
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(cache_files.os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        engine = _engine(model, cache, HIERARCHY + ("skip0.4",))
        for method in ("casspec", "self", "ar"):
            assert engine.generate(PROMPT, method, max_new_tokens=NEW).token_ids == reference
    warned = _warnings(caplog)
    assert warned and all("cannot write the cache folder" in w for w in warned)
    assert len(warned) == len(set(warned)) <= len(FILES) + 1  # one per folder, never one per write
    assert not _leftovers(cache)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_means_no_caching(model, reference, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="casspec.cache"):
            engine = _engine(model, cache)
            assert engine.generate(PROMPT, "casspec", max_new_tokens=NEW).token_ids == reference
        assert _warnings(caplog) and not list(cache.iterdir())
    finally:
        cache.chmod(0o700)


# ---- layer sets: read during load, written during decoding -------------------------------------------
@pytest.mark.parametrize("content", [
    '{"0.40": {"skip": [["attn", 1]], "sc',  # truncated
    "\x00\x17garbage",
    "[]",  # well-formed, wrong shape
    '{"0.40": {"skip": [["attn", 99]], "score": 0.5}}',  # a layer this model does not have
    '{"0.40": {"skip": [["attn", 1]]}}',
])
def test_damaged_layer_sets_are_ignored(content, model, reference, tmp_path, caplog):
    path = tmp_path / "cache" / "layer_sets" / "tiny-llama-skip0.4.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        engine = _engine(model, tmp_path / "cache", ("skip0.4", "pld"))
        assert engine.generate(PROMPT, "casspec", max_new_tokens=NEW).token_ids == reference
        engine.pool.searches["skip0.4"]._save()  # and a save over the damaged file works
    assert len(_warnings(caplog)) == 1
    assert "0.40" in json.loads(path.read_text())


def test_layer_set_saves_never_fail_a_request(model, tmp_path):
    """Concurrent saves (threads here; replicas are processes, each with its own temporary name) leave a
    valid file and no temporary ones; an unwritable folder is only a warning."""
    runner = _engine(model, None, ("pld",)).runner
    path = tmp_path / "layer_sets" / "sets.json"
    searches = [LayerSetSearch(runner, s, path=path, seed=i) for i, s in enumerate((0.2, 0.25, 0.3, 0.4))]
    threads = [threading.Thread(target=lambda s=s: [s._save() for _ in range(25)]) for s in searches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(json.loads(path.read_text())) <= {"0.20", "0.25", "0.30", "0.40"} and not _leftovers(tmp_path)
    blocked = LayerSetSearch(runner, 0.25, path=tmp_path / "file" / "sets.json")
    (tmp_path / "file").write_text("")
    blocked._save()  # no exception


# ---- two processes filling one empty cache at once ---------------------------------------------------
_CHILD = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from casspec.api import Engine
from casspec.testing import tiny_model, tiny_tokenizer
engine = Engine(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama", hierarchy={hierarchy!r},
                cache_dir=Path(sys.argv[1]), progress=False)
print(engine.generate({prompt!r}, "casspec", max_new_tokens={new}).token_ids)
"""


def test_two_processes_fill_one_empty_cache(model, reference, tmp_path, caplog):
    cache = tmp_path / "cache"
    code = _CHILD.format(hierarchy=HIERARCHY, prompt=PROMPT, new=NEW)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip().splitlines()[-1] == str(reference)
    assert all(len(list(cache.glob(pattern))) == 1 for pattern in FILES.values()) and not _leftovers(cache)
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        again = _engine(model, cache)
    assert not _warnings(caplog) and all("read from cache" in what for what, _ in again.runner.build_log)


# ---- a GGUF file's cached tokenizer and config, and its converted copy -------------------------------
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_loading import _make_gguf

    return _make_gguf(tmp_path_factory.mktemp("gguf") / "tiny-model.gguf")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_damaged_gguf_metadata_is_rebuilt(how, gguf_file, tmp_path, caplog):
    first = loading.load_gguf_native(gguf_file, "tiny-model", tmp_path)
    (meta,) = (tmp_path / "models").glob("*-meta")
    for f in meta.iterdir():  # every file of the folder, as the reproduction did
        _damage("meta", f, how)
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        again = loading.load_gguf_native(gguf_file, "tiny-model", tmp_path)
    assert again.tokenizer("a b ab c").input_ids == first.tokenizer("a b ab c").input_ids
    assert again.model.config.to_dict() == first.model.config.to_dict()
    assert len(_warnings(caplog)) == 1 and not _leftovers(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        loading.load_gguf_native(gguf_file, "tiny-model", tmp_path)
    assert not _warnings(caplog)


def test_damaged_converted_model_is_rebuilt(gguf_file, tmp_path, caplog):
    first = loading.load_gguf_converted(gguf_file, "tiny-model", tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        want = first.model(ids).logits
    del first  # its weights may be mapped from the file truncated next (another process's, in real life)
    (weights,) = next((tmp_path / "models").glob("tiny-model-*")).glob("*.safetensors")
    _damage("weights", weights, "truncated")
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        again = loading.load_gguf_converted(gguf_file, "tiny-model", tmp_path)
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, want)
    assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize("loader", ["native", "converted"])
def test_unwritable_model_cache_loads_without_caching(loader, gguf_file, tmp_path, caplog):
    (tmp_path / "models").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="casspec.cache"):
        if loader == "native":
            lm = loading.load_gguf_native(gguf_file, "tiny-model", tmp_path)
        else:
            lm = loading.load_gguf_converted(gguf_file, "tiny-model", tmp_path)
    assert lm.tokenizer("a b").input_ids and len(_warnings(caplog)) == 1
    if loader == "converted":  # the weights outlive the temporary folder they were read from
        with torch.inference_mode():
            assert torch.isfinite(lm.model(torch.tensor([[3, 4, 5]])).logits).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_a_killed_writers_temporary_file_is_swept(tmp_path):
    path = tmp_path / "latency" / "x.json"
    path.parent.mkdir()
    stale, fresh = path.with_name(".x.json.123.abc.tmp"), path.with_name(".x.json.456.def.tmp")
    stale.write_text("half"), fresh.write_text("being written")
    os.utime(stale, (0, 0))
    assert cache_files.write_json(path, {"a": 1}) and json.loads(path.read_text()) == {"a": 1}
    assert not stale.exists() and fresh.exists()
