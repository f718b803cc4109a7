"""Saved sessions: what save refuses to replace, every live state reopens, corruption and
bad files are named, and a crash or a second writer never loses a committed session."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from session_checks import RuleScorer

import megacontext as mc
from megacontext import session_store
from megacontext.session_store import HEAD, MARKER


def _ids(n, seed=0):
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed))


def _session(base, w_max=128, mode="exact", lens=True, gistnet=None, **kw):
    cfg = mc.MegaContextConfig(model=base.name, w_max=w_max, kv_mode=mode, **kw)
    lensnet = RuleScorer() if lens is True else (lens or None)
    return mc.MegaContext(base, gistnet, lensnet, cfg).session()


def _open(path, base, **kw):
    kw.setdefault("lensnet", RuleScorer())
    return mc.MegaContext.open(path, base=base, **kw)


def _version(path: Path) -> Path:
    return path / json.loads((path / HEAD).read_text())["version"]


def _resign(path: Path, meta_bytes: bytes | None = None) -> None:
    """Recompute the checksums after a deliberate edit, as a forger would: what is
    left to catch is every check besides the checksums."""
    version = _version(path)
    if meta_bytes is None:
        meta = json.loads((version / "session.json").read_text())
        meta["files"] = {
            k: v for k, v in session_store._checksums(version).items() if k != "session.json"
        }
        meta_bytes = json.dumps(meta).encode()
    (version / "session.json").write_bytes(meta_bytes)
    head = json.loads((path / HEAD).read_text())
    head["session.json"] = {"size": len(meta_bytes), "crc32": f"{zlib.crc32(meta_bytes):08x}"}
    (path / HEAD).write_text(json.dumps(head))


def _edit_meta(path: Path, change) -> None:
    meta_path = _version(path) / "session.json"
    meta = json.loads(meta_path.read_text())
    change(meta)
    _resign(path, json.dumps(meta).encode())


def _saved(base, tmp_path, n=400, **kw) -> tuple[Path, object]:
    s = _session(base, **kw)
    s.ingest(_ids(n))
    s.generate(5)
    path = tmp_path / "sess"
    s.save(path)
    return path, s


# ---------------------------------------------------------------- item 2: what save replaces


def test_save_refuses_a_folder_that_is_not_a_session(tiny_base, tmp_path):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    folder = tmp_path / "work"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\section{years of work}")
    (folder / "sub" / "photo.jpg").write_bytes(b"\xff\xd8jpeg")
    with pytest.raises(mc.StorageError, match="not a saved session") as e:
        s.save(folder)
    assert e.value.field == "path"
    assert (folder / "thesis.tex").read_text() == "\\section{years of work}"
    assert (folder / "sub" / "photo.jpg").read_bytes() == b"\xff\xd8jpeg"
    assert sorted(p.name for p in folder.iterdir()) == ["sub", "thesis.tex"]

    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(mc.StorageError, match="is a file") as e:
        s.save(file)
    assert e.value.field == "path" and file.read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    s.save(empty)  # an empty folder is fine
    s.ingest(_ids(40, seed=3))
    s.save(empty)  # and so is a saved session (overwritten)
    assert _open(empty, tiny_base).num_tokens == 340
    # a file a user dropped into a session folder survives saves
    (empty / "README").write_text("mine")
    s.save(empty)
    assert (empty / "README").read_text() == "mine"


# ---------------------------------------------------------------- item 3: every live state


@pytest.mark.parametrize("mode", ["exact", "splice"])
def test_save_after_every_decoded_token_reopens_identically(tiny_base, tmp_path, mode):
    """Between refocuses the WC holds up to K entries past w_max: each of those states
    saves and reopens with the same next-token logits, WC, allocator state and cache,
    and decoding on from the reopened session repeats the original's logits."""
    s = _session(tiny_base, w_max=100, mode=mode)
    s.ingest(_ids(300))
    path = tmp_path / "sess"
    logits, reopened = [], []
    over = 0
    for i in range(70):
        s.generate(1)
        logits.append(s.next_token_logits())
        over = max(over, len(s.wc) - s.config.w_max)
        s.save(path)
        r = _open(path, tiny_base)
        assert torch.equal(r.next_token_logits(), logits[-1]), i
        assert torch.equal(r.wc.levels, s.wc.levels) and torch.equal(r.wc.nodes, s.wc.nodes)
        assert torch.equal(r.allocator.state_dict()["state"], s.allocator.state_dict()["state"])
        n = len(s.wc)
        assert torch.equal(r.cache.kv[..., :n, :], s.cache.kv[..., :n, :])
        if i % 12 == 0:
            reopened.append((i, r))
    assert over > 0, "the decode never went past w_max between refocuses"
    for i, r in reopened:
        steps = len(logits) - 1 - i
        r.generate(steps)
        assert r.num_tokens == s.num_tokens
        torch.testing.assert_close(r.next_token_logits(), logits[-1], rtol=0, atol=0)


# ---------------------------------------------------------------- item 9: corruption


def test_flipped_bytes_and_truncation_are_named(tiny_base, tmp_path):
    path, _ = _saved(tiny_base, tmp_path)
    version = _version(path)
    for rel in ("tree/LOD1.ctx", "tree/LOD0.ctx", "state.safetensors"):
        f = version / rel
        good = f.read_bytes()
        bad = bytearray(good)
        bad[len(bad) - 7] ^= 0x10
        f.write_bytes(bytes(bad))
        with pytest.raises(mc.StorageError, match="corrupt") as e:
            _open(path, tiny_base)
        assert e.value.field == rel and rel in str(e.value)
        f.write_bytes(good[:-100])
        with pytest.raises(mc.StorageError, match="truncated") as e:
            _open(path, tiny_base)
        assert e.value.field == rel
        f.unlink()
        with pytest.raises(mc.StorageError, match="missing") as e:
            _open(path, tiny_base)
        assert e.value.field == rel
        f.write_bytes(good)
    _open(path, tiny_base)  # restored: opens again
    meta = version / "session.json"
    meta.write_bytes(meta.read_bytes().replace(b'"iteration": ', b'"iteration": 1'))
    with pytest.raises(mc.StorageError, match="corrupt") as e:
        _open(path, tiny_base)
    assert e.value.field == "session.json"


def test_forged_token_ids_and_state_are_refused(tiny_base, tmp_path):
    path, _ = _saved(tiny_base, tmp_path)
    lod0 = _version(path) / "tree" / "LOD0.ctx"
    good = lod0.read_bytes()
    bad = bytearray(good)
    bad[64 + 4 * 17 : 64 + 4 * 18] = (4_000_000_000).to_bytes(4, "little")
    lod0.write_bytes(bytes(bad))
    _resign(path)
    with pytest.raises(mc.StorageError, match="4000000000") as e:
        _open(path, tiny_base)
    assert e.value.field == "tokens" and "LOD0" in str(e.value)
    lod0.write_bytes(good)
    _resign(path)

    from safetensors.torch import load_file, save_file

    state = _version(path) / "state.safetensors"
    tensors = load_file(state)
    for name, value, field in (
        ("kv", tensors["kv"][..., :-1, :], "kv"),
        ("kv", torch.full_like(tensors["kv"], float("nan")), "kv"),
        ("next_logits", tensors["next_logits"][:-1], "next_logits"),
        ("wc_nodes", tensors["wc_nodes"].float(), "wc_nodes"),
        ("wc_nodes", tensors["wc_nodes"] + 1, "wc_levels"),  # not a legal tiling
        ("allocator_state", tensors["allocator_state"][:-1], "allocator_caps"),
    ):
        save_file({**tensors, name: value.contiguous()}, state)
        _resign(path)
        with pytest.raises(mc.StorageError) as e:
            _open(path, tiny_base)
        assert e.value.field == field, (name, str(e.value))
    state.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    _resign(path)
    with pytest.raises(mc.StorageError, match="safetensors") as e:
        _open(path, tiny_base)
    assert e.value.field == "state.safetensors"


def test_module_files_saved_and_missing(tiny_base, tmp_path):
    gist, lens = mc.GistNet(tiny_base.dim), mc.LensNet(tiny_base.dim)
    s = _session(tiny_base, lens=lens, gistnet=gist)
    s.ingest(_ids(300))
    path = tmp_path / "sess"
    s.save(path)
    r = mc.MegaContext.open(path, base=tiny_base)  # both modules come from the files
    assert isinstance(r.system.lensnet, mc.LensNet) and isinstance(r.system.gistnet, mc.GistNet)
    assert torch.equal(r.next_token_logits(), s.next_token_logits())
    (_version(path) / "lensnet.safetensors").unlink()
    _resign(path)  # even with the checksum list forged, session.json records it
    with pytest.raises(mc.StorageError, match="lensnet") as e:
        mc.MegaContext.open(path, base=tiny_base)
    assert e.value.field == "lensnet"

    # saved without a LensNet: opens without one; with one that cannot save: asks for it
    plain = _session(tiny_base, lens=None)
    plain.ingest(_ids(300))
    plain.save(tmp_path / "plain")
    assert mc.MegaContext.open(tmp_path / "plain", base=tiny_base).system.lensnet is None
    rule = _session(tiny_base)
    rule.ingest(_ids(300))
    rule.save(tmp_path / "rule")
    with pytest.raises(mc.StorageError, match="lensnet=") as e:
        mc.MegaContext.open(tmp_path / "rule", base=tiny_base)
    assert e.value.field == "modules.lensnet"


# ---------------------------------------------------------------- item 11: bad files


def test_bad_session_files_are_typed_errors(tiny_base, tmp_path):
    path, s = _saved(tiny_base, tmp_path)
    meta_path = _version(path) / "session.json"
    good = meta_path.read_bytes()
    cases = [
        (b"[1, 2, 3]", "session.json", "list"),
        (b"\xff\xfe{not utf-8", "session.json", "UTF-8"),
        (b'{"format": 2', "session.json", "JSON"),
    ]
    for raw, field, match in cases:
        _resign(path, raw)
        with pytest.raises(mc.StorageError, match=match) as e:
            _open(path, tiny_base)
        assert e.value.field == field and "session.json" in str(e.value)
    _resign(path, good)
    edits = [
        (lambda m: m.pop("config"), "config"),
        (lambda m: m["config"].update(w_max="lots"), "config.w_max"),
        (lambda m: m.update(allocator_caps=[0, 10**6, 3]), "allocator_caps"),
        (lambda m: m.update(allocator_caps=[0, 1]), "allocator_caps"),
        (lambda m: m.update(num_tokens=5), "num_tokens"),
        (lambda m: m.update(iteration=-1), "iteration"),
        (lambda m: m.update(query_end=-1), "query_end"),
        (lambda m: m.update(query_end="x"), "query_end"),
        (lambda m: m.update(query_end=10**6), "query_end"),
        (lambda m: m.update(focus_vetoed="yes"), "focus_vetoed"),
        (lambda m: m.update(focus_feed_check=-3), "focus_feed_check"),
        (lambda m: m.update(focus_held=[0, "x"]), "focus_held"),
        (lambda m: m.update(focus_held=[10**6]), "focus_held"),
        (lambda m: m.update(kv_sink=1), "kv_sink"),
        (lambda m: m.update(allocator_backend="rm -rf"), "allocator_backend"),
        (lambda m: m.update(modules={"gistnet": "none"}), "modules"),
        (lambda m: m.update(files={"../../etc/passwd": {"size": 1, "crc32": "00000000"}}), "files"),
    ]
    for change, field in edits:
        _edit_meta(path, change)
        with pytest.raises(mc.StorageError) as e:
            _open(path, tiny_base)
        assert e.value.field == field, str(e.value)
        _resign(path, good)
    _open(path, tiny_base)

    with pytest.raises(mc.StorageError, match="is a file") as e:
        _open(_version(path) / "state.safetensors", tiny_base)
    assert e.value.field == "path"
    with pytest.raises(mc.StorageError, match="session.json") as e:
        _open(tmp_path / "nowhere", tiny_base)
    head = json.loads((path / HEAD).read_text())
    (path / HEAD).write_text(json.dumps({**head, "format_version": 3}))
    with pytest.raises(mc.StorageError, match="format 3") as e:
        _open(path, tiny_base)
    assert e.value.field == "format_version"
    fresh = _session(tiny_base)
    fresh.ingest(_ids(100))
    for who in (s, fresh):  # a session this version cannot read is never replaced
        with pytest.raises(mc.StorageError, match="format 3") as e:
            who.save(path)
        assert e.value.field == "format_version"
    assert json.loads((path / HEAD).read_text())["format_version"] == 3


def test_the_saved_base_never_chooses_what_is_loaded(tiny_base, tmp_path, monkeypatch):
    path, _ = _saved(tiny_base, tmp_path)
    loaded = []
    monkeypatch.setattr("megacontext.runtime.load_base", lambda name, *a, **k: loaded.append(name))
    for target in ("/tmp/attacker-model", "someone/evil-model"):
        _edit_meta(path, lambda m, t=target: m.update(base=t))
        with pytest.raises(mc.StorageError, match="pass base=") as e:
            mc.MegaContext.open(path, lensnet=RuleScorer())
        assert e.value.field == "base" and target in str(e.value)
    assert loaded == []
    with pytest.raises(mc.StorageError, match="someone/evil-model") as e:
        mc.MegaContext.open(path, base=tiny_base, lensnet=RuleScorer())
    assert e.value.field == "base"


# ---------------------------------------------------------------- format 1


def _save_format1(s, path: Path) -> None:
    """The format-1 writer as it shipped (flat folder, no checksums)."""
    from safetensors.torch import save_file

    path.mkdir()
    s.tree.save(path / "tree")
    n = len(s.wc)
    save_file(
        {
            "wc_levels": s.wc.levels.contiguous(),
            "wc_nodes": s.wc.nodes.contiguous(),
            "allocator_state": s.allocator.state_dict()["state"],
            "kv": s.cache.kv[:, :, :, :, :n].contiguous(),
            "next_logits": s._next_logits.contiguous(),
        },
        str(path / "state.safetensors"),
    )
    meta = {
        "format": 1,
        "base": s.base.name,
        "config": s.config.model_dump(),
        "allocator_backend": s.system.allocator_backend,
        "allocator_caps": s.allocator.state_dict()["caps"],
        "iteration": s.iteration,
        "blocks_since_refocus": s._blocks_since_refocus,
        "residencies": s.residencies,
        "num_tokens": s.num_tokens,
    }
    (path / "session.json").write_text(json.dumps(meta, indent=1))


def test_format1_sessions_open_and_convert(tiny_base, tmp_path):
    s = _session(tiny_base)
    s.ingest(_ids(400))
    s.generate(7)
    old = tmp_path / "old"
    _save_format1(s, old)
    r = _open(old, tiny_base)
    # format 1 predates the attention sink (no kv_sink): a WC that now reads the sink
    # has its rows recomputed, to a fresh forward's rounding
    assert r.cache.sink_on == [True]
    torch.testing.assert_close(r.next_token_logits(), s.next_token_logits(), rtol=1e-4, atol=1e-4)
    r.generate(3)
    r.save(old)  # converted in place to the current format
    assert sorted(p.name for p in old.iterdir()) == [HEAD, MARKER, "v00000001"]
    assert _open(old, tiny_base).num_tokens == s.num_tokens + 3
    other = tmp_path / "future"
    _save_format1(s, other)
    meta = json.loads((other / "session.json").read_text())
    (other / "session.json").write_text(json.dumps({**meta, "format": 9}))
    with pytest.raises(mc.StorageError, match="format 9") as e:
        _open(other, tiny_base)
    assert e.value.field == "format"
    with pytest.raises(mc.StorageError, match="not a saved session"):
        s.save(other)  # an unknown format is not ours to replace


def test_a_link_out_of_the_session_folder_is_refused(tiny_base, tmp_path):
    path, _ = _saved(tiny_base, tmp_path)
    state = _version(path) / "state.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(state.read_bytes())
    state.unlink()
    state.symlink_to(outside)
    with pytest.raises(mc.StorageError, match="link out of the session folder") as e:
        _open(path, tiny_base)
    assert e.value.field == "state.safetensors"


def test_format1_folder_with_user_files_and_version_folders(tiny_base, tmp_path):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    old = tmp_path / "old"
    _save_format1(s, old)
    (old / "README").write_text("mine")
    assert _open(old, tiny_base).num_tokens == 300  # a file beside it changes nothing
    with pytest.raises(mc.StorageError, match="README") as e:
        s.save(old)  # but a save would have to replace it
    assert e.value.field == "path" and (old / "README").read_text() == "mine"
    new = tmp_path / "new"
    s.save(new)
    with pytest.raises(mc.StorageError, match="version folder") as e:
        _open(_version(new), tiny_base)
    assert e.value.field == "path"


def test_a_session_saves_again_where_its_folder_was_removed(tiny_base, tmp_path):
    path, _ = _saved(tiny_base, tmp_path)
    r = _open(path, tiny_base)
    shutil.rmtree(path)  # nothing committed there any more: no update can be lost
    r.save(path)
    assert _open(path, tiny_base).num_tokens == r.num_tokens


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(tiny_base, tmp_path):
    path, _ = _saved(tiny_base, tmp_path)
    (path / ".HEAD.json.k3x_9q.tmp").write_text("{")  # a HEAD write killed mid-way
    (path / ".v00000002.tmp-a1b2").mkdir()  # a version write killed mid-way
    (path / ".v00000002.tmp-a1b2" / "state.safetensors").write_bytes(b"partial")
    (path / "v00000007").mkdir()  # a version renamed in, HEAD never swapped
    keep = [".HEAD.json.notes", "v7-draft", "my.tmp"]
    for name in keep:
        (path / name).write_text("mine")
    _open(path, tiny_base)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [HEAD, MARKER, _version(path).name, *keep]
    )
