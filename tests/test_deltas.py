"""Delta transfer of changed files (strata.engine.delta): an endpoint on an old base
migrates to a new one where most binaries change a little, rebuilding those files from
its own copies plus deltas; a corrupted delta, or a local copy that is not what the
server made the delta against, is caught and the file comes by chunks; the tree ends
equal to the new base plus the endpoint's own layers; a second endpoint costs the server
no delta computation."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import blake3
import httpx
import pytest
import zstandard

from server_fixtures import MIB, Agent, Server, admin, build_os_tree, centralized, strata_json
from strata.agent import deltas
from strata.engine import delta as codec
from strata.errors import CorruptData
from strata.layers.changes import Action, Change
from strata.layers.plan import Plan
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.store.repository import Store
from test_layers import USER_LAYERS, tree_state, under, without


def mutate(data: bytes, rng: random.Random, every: int = 1500) -> bytes:
    """What a rebuild by a newer compiler does to a binary, roughly: a byte changed here
    and there all through the file and a few bytes inserted, so that no content-defined
    chunk of the old file survives while a delta stays small."""
    out = bytearray(data)
    for pos in range(rng.randrange(every), len(out), every):
        out[pos] ^= 0x5A
    mid = len(out) // 2
    out[mid:mid] = rng.randbytes(7)
    return bytes(out)


# -- the codec and the rules ---------------------------------------------------------------


def test_delta_rebuilds_the_new_file_and_is_far_smaller_than_it():
    rng = random.Random(1)
    old = bytes(rng.choice(b"abcdefgh \n") for _ in range(300_000))
    new = mutate(old, rng)
    d = codec.encode(old, new)
    assert codec.decode(old, d, len(new)) == new
    assert len(d) < codec.compressed_alone(new) / 5


def test_a_corrupted_delta_or_the_wrong_old_file_never_passes_for_the_new_one():
    rng = random.Random(2)
    old = rng.randbytes(100_000)
    new = mutate(old, rng)
    d = codec.encode(old, new)
    flipped = bytearray(d)
    flipped[len(d) // 2] ^= 0xFF
    try:  # zstd's own frame checks usually catch it; the content hash catches the rest
        assert codec.decode(old, bytes(flipped), len(new)) != new
    except CorruptData:
        pass
    other = mutate(old, random.Random(9))  # not the version the delta was made against
    try:
        assert codec.decode(other, d, len(new)) != new
    except CorruptData:
        pass
    with pytest.raises(CorruptData):  # never more output than the file's size
        codec.decode(old, d, len(new) - 1)


def test_when_a_delta_is_tried_and_when_it_pays():
    k = 1 << 10
    assert codec.worth_trying(old_size=100 * k, new_size=100 * k, lacking_bytes=64 * k)
    assert not codec.worth_trying(100 * k, 100 * k, lacking_bytes=4 * k)  # small: chunks
    assert not codec.worth_trying(0, 100 * k, 64 * k)  # nothing to patch from
    assert not codec.worth_trying(100 * k, codec.MAX_DELTA_BYTES + 1, 64 * k)
    assert not codec.worth_trying(codec.MAX_DELTA_BYTES + 1, 100 * k, 64 * k)
    # The new file compresses alone to 40 KiB and the endpoint lacks all of it ...
    assert codec.pays(delta_bytes=10 * k, alone_bytes=40 * k, new_size=100 * k,
                      lacking_bytes=100 * k)
    assert not codec.pays(35 * k, 40 * k, 100 * k, 100 * k)
    # ... or only a fifth of it: the delta must beat those chunks, not the whole file.
    assert not codec.pays(10 * k, 40 * k, 100 * k, 20 * k)


def test_delta_batches_reject_bad_framing():
    body = codec.pack_deltas([codec.GroupDelta(b"o" * 32, b"n" * 32, 5, b"xyz")])
    assert [d.delta for d in codec.read_deltas(body)] == [b"xyz"]
    for bad in (b"nope" + body[4:], body[:-1], body[:50]):
        with pytest.raises(CorruptData):
            list(codec.read_deltas(bad))


def test_the_old_version_of_a_file_is_found_where_a_release_moved_it():
    def f(path: bytes, size: int) -> Entry:
        return Entry(path=path, type=EntryType.FILE, mode=0o644, size=size,
                     content_hash=content_id(b"%s %d" % (path, size)),
                     chunks=[(content_id(b"%s %d c" % (path, size)), size)])
    link = Entry(path=b"usr/lib/libc.so.6", type=EntryType.SYMLINK, mode=0o777,
                 link_target=b"libc-2.31.so")
    current = [f(b"usr/lib/libssl.so.1.1", 500_000), f(b"usr/lib/python3.9/x.so", 90_000),
               f(b"usr/lib/python3.10/x.so", 300_000), f(b"usr/bin/tool", 90_000),
               f(b"usr/lib/libc-2.31.so", 1_900_000), link,
               f(b"lib/x86_64/libfoo.so.1", 40_000), f(b"usr/lib/same", 1000)]
    new = [f(b"usr/lib/libssl.so.3", 600_000), f(b"usr/lib/python3.11/x.so", 100_000),
           f(b"usr/bin/other", 90_000), f(b"usr/lib/libc.so.6", 1_920_000),
           f(b"usr/lib/x86_64/libfoo.so.2", 41_000), f(b"usr/lib/same", 1200)]
    plan = Plan(changes=[Change(Action.REPLACE if e.path in (link.path, b"usr/lib/same")
                                else Action.ADD, e.path, e,
                                link if e.path == link.path else current[-1]
                                if e.path == b"usr/lib/same" else None) for e in new])
    lacking = {cid for e in new for cid, _ in e.chunks}
    got = {c.new.path: c.old.path for c in deltas.candidates(plan, current, lacking)}
    assert got == {
        b"usr/lib/libssl.so.3": b"usr/lib/libssl.so.1.1",  # only the version differs
        b"usr/lib/python3.11/x.so": b"usr/lib/python3.9/x.so",  # ... the closest in size
        b"usr/lib/libc.so.6": b"usr/lib/libc-2.31.so",  # what the old symlink pointed to
        b"usr/lib/x86_64/libfoo.so.2": b"lib/x86_64/libfoo.so.1",  # moved: its name
        b"usr/lib/same": b"usr/lib/same",  # replaced in place
    }  # usr/bin/other: no older version, chunks
    # Nothing lacking: nothing to ask for.
    assert deltas.candidates(plan, current, set()) == []


def test_groups_are_cut_by_content_so_one_differing_file_moves_no_boundary_elsewhere():
    rng = random.Random(8)

    def cand(i: int, size: int) -> deltas.Candidate:
        e = Entry(path=b"f%05d" % i, type=EntryType.FILE, mode=0o644, size=size,
                  content_hash=rng.randbytes(32), chunks=[])
        return deltas.Candidate(e, e, size)
    files = [cand(i, rng.randrange(10_000, 400_000)) for i in range(400)]
    cut = [[c.new.path for c in g] for g in deltas.groups(files)]
    sizes = [sum(c.new.size for c in g) for g in deltas.groups(files)]
    assert len(cut) > 3 and all(s <= codec.GROUP_MAX_BYTES + 400_000 for s in sizes)
    assert [p for g in cut for p in g] == [c.new.path for c in files]  # in order, all
    # One endpoint lacks a file in the middle of the third group: the groups before and
    # after (from the next boundary on) are the same, so the server's cache serves them.
    gone = cut[2][len(cut[2]) // 2]
    other = [[c.new.path for c in g] for g in deltas.groups([c for c in files
                                                               if c.new.path != gone])]
    assert other[:2] == cut[:2]
    assert other[-2:] == cut[-2:]


class DeltaServer:
    """Answers delta requests as the server does, from the versions it was given."""

    def __init__(self, files: dict[bytes, bytes], tamper: bool = False):
        self.files = files  # content hash -> content
        self.tamper = tamper

    def request(self, method: str, path: str, json: dict, **_: object) -> SimpleNamespace:
        out = []
        for g in json["groups"]:
            olds = [bytes.fromhex(f["old"]) for f in g["files"]]
            news = [bytes.fromhex(f["new"]) for f in g["files"]]
            old = b"".join(self.files[h] for h in olds)
            new = b"".join(self.files[h] for h in news)
            d = codec.encode(old, new)
            if self.tamper:  # a valid frame of the right size that rebuilds other bytes
                d = zstandard.ZstdCompressor().compress(new[::-1])
            out.append(codec.GroupDelta(codec.group_key(olds), codec.group_key(news),
                                        len(new), d))
        return SimpleNamespace(content=codec.pack_deltas(out))


def _file(path: bytes, data: bytes, step: int = 40_000) -> Entry:
    pieces = [data[i:i + step] for i in range(0, len(data), step)]
    return Entry(path=path, type=EntryType.FILE, mode=0o644, size=len(data),
                 content_hash=content_id(data), chunks=[(content_id(p), len(p)) for p in pieces])


@pytest.mark.parametrize("case", ["ok", "tampered", "local-copy-changed"])
def test_agent_rebuilds_from_its_copy_or_falls_back_to_chunks(tmp_path, case):
    rng = random.Random(5)
    old = bytes(rng.choice(b"0123456789abcdef") for _ in range(200_000))
    new = mutate(old, rng)
    (tmp_path / "root/usr/lib").mkdir(parents=True)
    (tmp_path / "root/usr/lib/libx.so").write_bytes(old)
    old_e, new_e = _file(b"usr/lib/libx.so", old), _file(b"usr/lib/libx.so", new)
    plan = Plan(changes=[Change(Action.REPLACE, new_e.path, new_e, old_e)])
    if case == "local-copy-changed":  # after the tree was read: not what the plan says
        (tmp_path / "root/usr/lib/libx.so").write_bytes(mutate(old, rng))
    server = DeltaServer({content_id(old): old, content_id(new): new},
                         tamper=case == "tampered")
    Store.init(tmp_path / "cache", compression="zstd:3").close()
    cache = Store.open(tmp_path / "cache")
    try:
        lacking = [cid for cid, _ in new_e.chunks]
        stats = deltas.fill_by_deltas(server, bytes(tmp_path / "root"), cache,  # type: ignore[arg-type]
                                      plan, [old_e], lacking)
        assert stats.asked == 1
        if case == "ok":
            assert stats.rebuilt == 1 and not stats.failed
            assert cache.missing_chunks(lacking) == []
            assert b"".join(cache.load_chunk(c) for c in lacking) == new
        else:
            assert stats.rebuilt == 0 and len(stats.failed) == 1
            why = "content hash" if case == "tampered" else "local copy changed"
            assert why in stats.failed[0], stats.failed
            assert sorted(cache.missing_chunks(lacking)) == sorted(set(lacking))  # chunks
    finally:
        cache.close()


# -- end to end: a migration through deltas ------------------------------------------------


def make_bases(base: Path) -> tuple[Path, Path, dict[str, tuple[bytes, bytes]]]:
    """v1 a generated OS tree; v2 with every file over 32 KiB changed a little, one
    versioned library renamed (libdemo.so.1 -> libdemo.so.2) and a file added. Returns the
    trees and, per changed path of v2, (v1's content, v2's)."""
    v1 = base / "base-v1"
    build_os_tree(v1, 6 * MIB)
    rng = random.Random(11)
    big = max((p for p in (v1 / "usr").rglob("*") if p.is_file() and not p.is_symlink()),
              key=lambda p: p.stat().st_size)
    (v1 / "usr/lib/demo").mkdir(parents=True)
    shutil.copyfile(big, v1 / "usr/lib/demo/libdemo.so.1")
    v2 = base / "base-v2"
    shutil.copytree(v1, v2, symlinks=True)
    (v2 / "etc/os-release").write_text('ID=stratatest\nVERSION_ID="2"\n')
    changed = {}
    for p in sorted(v2.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.stat().st_size > 32 << 10:
            data = p.read_bytes()
            changed[str(p.relative_to(v2))] = (data, mutate(data, rng))
            p.write_bytes(changed[str(p.relative_to(v2))][1])
    (v2 / "usr/lib/demo/libdemo.so.1").rename(v2 / "usr/lib/demo/libdemo.so.2")
    changed["usr/lib/demo/libdemo.so.2"] = changed.pop("usr/lib/demo/libdemo.so.1")
    (v2 / "usr/share/new.txt").parent.mkdir(parents=True, exist_ok=True)
    (v2 / "usr/share/new.txt").write_text("added in v2\n")
    return v1, v2, changed


def _damage_deltas(server: Server) -> int:
    """Flip a byte in the middle of every delta the server keeps, each entry resealed
    with a valid checksum (a damaged or hostile cache, as a reflector's could be).
    Returns how many."""
    n = 0
    for f in (server.data / "cache" / "deltas").iterdir():
        body = bytearray(f.read_bytes()[32:])
        body[8 + (len(body) - 8) // 2] ^= 0xFF
        f.write_bytes(blake3.blake3(bytes(body)).digest() + bytes(body))
        n += 1
    return n


@pytest.mark.e2e
def test_endpoints_on_an_old_base_migrate_through_deltas(tmp_path):
    v1, v2, changed = make_bases(tmp_path)
    server = Server(tmp_path / "server").start()
    world = SimpleNamespace(server=server)
    try:
        agents = []
        token = server.create_token(uses=None)
        for i in (1, 2, 3):
            root = tmp_path / f"endpoint-{i}"
            shutil.copytree(v1, root, symlinks=True)
            (root / "etc/hostname").write_text(f"endpoint-{i}\n")
            (root / "etc/machine-id").write_text(f"{i:032x}\n")
            (root / f"home/user{i}").mkdir(parents=True)
            (root / f"home/user{i}/notes.txt").write_text(f"user {i}'s notes\n")
            (root / f"opt/userapp{i}").mkdir(parents=True)
            (root / f"opt/userapp{i}/app").write_text(f"user app {i}\n")
            agent = Agent(server, root, tmp_path / f"state-{i}")
            agent.state.mkdir()
            agent.enroll(token)
            centralized(agent.run_once())
            agents.append(agent)
        for version, tree in (("1", v1), ("2", v2)):
            admin(world, "layer", "capture", "--kind", "base", "--name", "os", "--version",
                  version, "--from-dir", tree)
        admin(world, "assign", "--all", "--base", "os:1")
        for agent in agents:
            assert agent.run_once()["update"]["state"] == "applied"

        # Endpoint 1 edited a system file: its copy is no longer what the server holds.
        e1, e2, e3 = agents
        edited = e1.root / sorted(changed)[1]
        edited.write_bytes(edited.read_bytes()[:-100] + b"local edit")
        before = {a.endpoint_id: tree_state(a.root) for a in agents}

        admin(world, "assign", "--all", "--base", "os:2")
        up1 = e1.run_once()["update"]
        assert up1["state"] == "ready", up1
        misses = server.metric('strata_file_delta_cache_total{cache="miss"}')
        up2 = e2.run_once()["update"]
        assert up2["state"] == "ready", up2
        # Endpoint 2 rebuilt every changed file from its copies and deltas (the binaries,
        # the renamed library, etc/os-release); endpoint 1 all but the group of the file
        # it edited (no delta against content the server does not hold: that group came
        # by chunks).
        assert up2["files_by_delta"] == len(changed) + 1, up2
        assert up1["files_by_delta"] < up2["files_by_delta"], up1
        # Far fewer bytes than the changed files' chunks (compressed alone: a lower bound
        # of what they cost by chunks).
        by_chunks = sum(codec.compressed_alone(new) for _, new in changed.values())
        assert up2["bytes_downloaded"] < by_chunks / 3, (up2, by_chunks)
        # Endpoint 2's deltas were computed for endpoint 1, all but that one group.
        assert server.metric('strata_file_delta_cache_total{cache="miss"}') == misses + 1
        # Each took base 2's manifest as a delta against base 1's (computed once).
        assert server.metric('strata_file_deltas_total{outcome="manifest"}') == 2

        # Every delta damaged: endpoint 3 detects each and takes chunks (and the manifest
        # whole) instead.
        assert _damage_deltas(server) >= 2
        up3 = e3.run_once()["update"]
        assert up3["state"] == "ready", up3
        assert up3["files_by_delta"] == 0, up3
        assert any("content hash" in w or "does not decompress" in w
                   for w in up3["warnings"]), up3
        assert up3["bytes_downloaded"] > up2["bytes_downloaded"] * 3, (up2, up3)
        print(f"by delta: {up2['bytes_downloaded']} B; by chunks: {up3['bytes_downloaded']} "
              f"B; the changed files alone, compressed: {by_chunks} B")

        _hostile_requests(e2, *changed[sorted(changed)[2]])
        v2_state = tree_state(v2)
        for agent in agents:
            res = strata_json(*agent.cmd("apply"))
            assert res["state"] == "applied", res
            now = tree_state(agent.root)
            assert without(now, *USER_LAYERS) == without(v2_state, *USER_LAYERS)
            assert under(now, *USER_LAYERS) == under(before[agent.endpoint_id], *USER_LAYERS)
            assert "usr/lib/demo/libdemo.so.1" not in now
    finally:
        server.stop()
        server.kill()


def _hostile_requests(agent: Agent, old: bytes, new: bytes) -> None:
    """Deltas only of the endpoint's layers' files, against content it holds."""
    url = "/api/v1/agent/layers/deltas"
    with agent.http() as http:
        def ask(o: bytes, n: bytes, lacking: int = 1 << 20) -> httpx.Response:
            return http.post(url, json={"groups": [{"files": [{"old": o.hex(),
                                                               "new": n.hex()}],
                                                    "lacking": lacking}]})
        ok = ask(content_id(old), content_id(new))
        assert ok.status_code == 200 and list(codec.read_deltas(ok.content))
        # Content that is no layer of this endpoint's: refused, in one plain line.
        r = ask(content_id(old), content_id(b"someone else's file"))
        assert r.status_code == 403 and "not part of this endpoint's layers" in r.text
        # An old version it does not hold: no delta, the same answer whoever holds it.
        r = ask(content_id(b"not on this endpoint"), content_id(new))
        assert r.status_code == 200 and list(codec.read_deltas(r.content)) == []
        assert ask(b"xx", content_id(new)).status_code == 422
        bad = {"old": "zz" * 32, "new": "00" * 32}
        assert http.post(url, json={"groups": [{"files": [bad], "lacking": 1}]}
                         ).status_code == 422
        many = [{"files": [{"old": "00" * 32, "new": "00" * 32}] * 600, "lacking": 1}] * 2
        assert http.post(url, json={"groups": many}).status_code == 413


class ManifestServer:
    """Answers manifest-delta requests with a delta of `new` against `old`, or a forged one."""

    def __init__(self, old: bytes, new: bytes, forged: bool = False):
        self.old, self.new, self.forged, self.asked = old, new, forged, 0

    def request(self, method: str, path: str, **_: object) -> SimpleNamespace:
        self.asked += 1
        d = codec.encode(self.old, self.new)
        new_hash = content_id(self.new)
        if self.forged:  # a valid frame of other bytes, claiming the right hash
            d = codec.encode(self.old, self.new[::-1])
        return SimpleNamespace(content=codec.pack_deltas(
            [codec.GroupDelta(content_id(self.old), new_hash, len(self.new), d)]))


def test_a_layer_manifest_is_patched_from_the_previous_version_kept(tmp_path):
    from strata.model.wire import DesiredLayer
    rng = random.Random(4)
    old = bytes(rng.choice(b"usr/lib/abcdef") for _ in range(50_000))
    new = mutate(old, rng)
    v1 = DesiredLayer(id=1, kind="base", name="os", version="1", snapshot="a" * 64)
    v2 = DesiredLayer(id=2, kind="base", name="os", version="2", snapshot="b" * 64)
    other = DesiredLayer(id=3, kind="app", name="office", version="1", snapshot="c" * 64)
    server = ManifestServer(old, new)
    assert deltas.manifest_by_delta(server, tmp_path, v2) is None  # nothing kept yet
    assert server.asked == 0
    (tmp_path / f"{v1.snapshot}.manifest").write_bytes(old)
    deltas.note_manifest(tmp_path, v1)
    assert deltas.manifest_by_delta(server, tmp_path, other) is None  # another layer
    assert deltas.manifest_by_delta(server, tmp_path, v2) == new  # type: ignore[arg-type]
    # A delta that rebuilds other bytes than it claims: None, and the agent fetches it whole.
    assert deltas.manifest_by_delta(ManifestServer(old, new, forged=True),  # type: ignore[arg-type]
                                    tmp_path, v2) is None
