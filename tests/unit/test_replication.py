from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nsync_mqtt.errors import ProtocolError, SongMissing
from nsync_mqtt.messages import decode_chunk, encode_chunk
from nsync_mqtt.replication import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    SongStore,
    choose_evictions,
    chunk_header,
    plan_chunks,
    read_chunk,
    sha224_bytes,
    sha224_file,
)

KIB = 1024
# 3 full chunks of 1 KiB and a short last one of 100 bytes.
DATA = bytes(range(256)) * 12 + b"x" * 100
SONG = hashlib.sha224(DATA).hexdigest()


def manifest(data: bytes = DATA, chunk_size: int = KIB) -> Manifest:
    return Manifest(sha224_bytes(data), len(data), chunk_size)


def chunk(m: Manifest, data: bytes, index: int) -> tuple[dict[str, object], bytes]:
    offset, length = m.chunk_span(index)
    return chunk_header(m, index), data[offset : offset + length]


def song_bytes(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


# -- hashing and manifests ---------------------------------------------------------------


def test_sha224_file_matches_bytes(tmp_path: Path) -> None:
    p = tmp_path / "song"
    p.write_bytes(DATA)
    assert sha224_file(p) == sha224_bytes(DATA) == SONG


def test_manifest_chunk_geometry_with_short_last_chunk() -> None:
    m = manifest()
    assert m.n_chunks == 4
    assert m.chunk_span(0) == (0, KIB)
    assert m.chunk_span(2) == (2 * KIB, KIB)
    assert m.chunk_span(3) == (3 * KIB, 100)
    exact = Manifest(SONG, 2 * KIB, KIB)
    assert exact.n_chunks == 2
    assert exact.chunk_span(1) == (KIB, KIB)


@pytest.mark.parametrize("index", [-1, 4, 1.0, True, "0"])
def test_chunk_span_refuses_bad_index(index: object) -> None:
    with pytest.raises(ProtocolError, match="chunk index"):
        manifest().chunk_span(index)  # type: ignore[arg-type]


def test_manifest_round_trips_through_dict() -> None:
    m = manifest()
    assert m.to_dict() == {"song": SONG, "size": len(DATA), "chunk_size": KIB}
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(chunk_header(m, 3)) == m


@pytest.mark.parametrize(
    ("d", "field"),
    [
        ({"size": 10, "chunk_size": KIB}, "'song'"),
        ({"song": SONG, "chunk_size": KIB}, "'size'"),
        ({"song": SONG, "size": 10}, "'chunk_size'"),
        ({"song": "abc", "size": 10, "chunk_size": KIB}, "'song'"),
        ({"song": SONG.upper(), "size": 10, "chunk_size": KIB}, "'song'"),
        ({"song": SONG, "size": "10", "chunk_size": KIB}, "'size'"),
        ({"song": SONG, "size": 0, "chunk_size": KIB}, "'size'"),
        ({"song": SONG, "size": True, "chunk_size": KIB}, "'size'"),
        ({"song": SONG, "size": 10, "chunk_size": 512}, "'chunk_size'"),
        ({"song": SONG, "size": 10, "chunk_size": 9 * 1024 * 1024}, "'chunk_size'"),
        ({"song": SONG, "size": 10, "chunk_size": 1024.0}, "'chunk_size'"),
    ],
)
def test_manifest_from_dict_names_the_bad_field(d: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError, match=f"manifest field {field}"):
        Manifest.from_dict(d)


def test_manifest_from_dict_refuses_non_object_and_oversize() -> None:
    with pytest.raises(ProtocolError, match="JSON object"):
        Manifest.from_dict([SONG, 10, KIB])
    with pytest.raises(ProtocolError, match="'size' is 5000 bytes, over the limit of 4096"):
        Manifest.from_dict({"song": SONG, "size": 5000, "chunk_size": KIB}, max_size=4096)
    assert Manifest.from_dict({"song": SONG, "size": 4096, "chunk_size": KIB}, 4096).size == 4096


# -- planning ------------------------------------------------------------------------------


def test_plan_chunks_empty_partial_complete() -> None:
    m = manifest()
    assert plan_chunks(m, []) == [0, 1, 2, 3]
    assert plan_chunks(m, [3, 1]) == [0, 2]
    assert plan_chunks(m, range(4)) == []


def test_read_chunk_and_frame_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "song"
    p.write_bytes(DATA)
    m = Manifest.of_file(p, KIB)
    assert m == manifest()
    assert read_chunk(p, m, 3) == b"x" * 100
    header, body = decode_chunk(encode_chunk(chunk_header(m, 1), read_chunk(p, m, 1)))
    assert header == {"song": SONG, "size": len(DATA), "chunk_size": KIB, "index": 1}
    assert bytes(body) == DATA[KIB : 2 * KIB]
    with pytest.raises(ProtocolError, match="shorter"):
        read_chunk(p, Manifest(SONG, len(DATA) + KIB, KIB), 4)


# -- assembly ------------------------------------------------------------------------------


def test_assembly_refuses_bad_index_and_length(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    asm = store.assembly(manifest())
    with pytest.raises(ProtocolError, match="chunk index"):
        asm.add(4, b"x" * 100)
    with pytest.raises(ProtocolError, match="must be 100 bytes, got 1024"):
        asm.add(3, DATA[:KIB])
    with pytest.raises(ProtocolError, match="must be 1024 bytes, got 100"):
        asm.add(0, b"x" * 100)
    assert asm.received_count == 0
    assert asm.missing() == [0, 1, 2, 3]
    store.close()


def test_out_of_order_chunks_complete_and_verify(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    m = manifest()
    results = []
    for index in (3, 1, 0):
        header, body = chunk(m, DATA, index)
        results.append(store.add_chunk(header, memoryview(body), now=10.0))
    assert results == [(SONG, False)] * 3
    asm = store.assembly(m)
    assert asm.missing() == [2]
    assert asm.bytes_received == 2 * KIB + 100
    assert not asm.complete
    assert asm.add(0, DATA[:KIB]) is False  # duplicate
    header, body = chunk(m, DATA, 2)
    assert store.add_chunk(header, body, now=11.0) == (SONG, True)
    assert store.has(SONG)
    assert store.path(SONG).read_bytes() == DATA
    assert store.size_of(SONG) == len(DATA)
    assert store.partial_songs() == []
    assert list((tmp_path / "partial").iterdir()) == []
    # Chunks of a song already held are ignored.
    assert store.add_chunk(header, body, now=12.0) == (SONG, False)
    store.close()


def test_corrupted_chunk_raises_hash_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    m = manifest()
    for index in range(3):
        header, body = chunk(m, DATA, index)
        if index == 1:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        store.add_chunk(header, body, now=1.0)
    header, body = chunk(m, DATA, 3)
    with pytest.raises(ProtocolError, match="hash mismatch"):
        store.add_chunk(header, body, now=2.0)
    assert not store.has(SONG)
    assert store.songs() == []
    assert store.partial_songs() == []
    assert list((tmp_path / "partial").iterdir()) == []
    assert list((tmp_path / "songs").iterdir()) == []
    # A fresh transfer of the same song starts from scratch and succeeds.
    for index in range(4):
        done = store.add_chunk(*chunk(m, DATA, index), now=3.0)
    assert done == (SONG, True)
    store.close()


def test_bad_chunk_header_is_refused(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    header, body = chunk(manifest(), DATA, 0)
    del header["index"]
    with pytest.raises(ProtocolError, match="'index'"):
        store.add_chunk(header, body, now=1.0)
    with pytest.raises(ProtocolError, match="'size'"):
        store.add_chunk({"song": SONG, "chunk_size": KIB, "index": 0}, body, now=1.0)
    store.close()


def test_restart_resumes_received_chunks(tmp_path: Path) -> None:
    m = manifest()
    first = SongStore(tmp_path, cap_bytes=10 * KIB)
    for index in (0, 2):
        first.add_chunk(*chunk(m, DATA, index), now=1.0)
    first.close()

    second = SongStore(tmp_path, cap_bytes=10 * KIB)
    assert second.partial_songs() == [m]
    asm = second.assembly(m)
    assert asm.missing() == [1, 3]
    assert asm.received_count == 2
    assert second.add_chunk(*chunk(m, DATA, 1), now=2.0) == (SONG, False)
    assert second.add_chunk(*chunk(m, DATA, 3), now=2.0) == (SONG, True)
    assert second.path(SONG).read_bytes() == DATA
    second.close()


def test_resume_tolerates_a_torn_have_record(tmp_path: Path) -> None:
    m = manifest()
    first = SongStore(tmp_path, cap_bytes=10 * KIB)
    first.add_chunk(*chunk(m, DATA, 1), now=1.0)
    first.close()
    with open(tmp_path / "partial" / f"{SONG}.have", "ab") as f:
        f.write(b"\0\0")  # half of an index record, as left by a crash
    second = SongStore(tmp_path, cap_bytes=10 * KIB)
    asm = second.assembly(m)
    assert asm.missing() == [0, 2, 3]
    for index in (0, 2, 3):
        done = second.add_chunk(*chunk(m, DATA, index), now=2.0)
    assert done == (SONG, True)
    second.close()


def test_conflicting_manifest_restarts_the_assembly(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    small = manifest()
    store.add_chunk(*chunk(small, DATA, 0), now=1.0)
    big = manifest(chunk_size=2 * KIB)
    asm = store.assembly(big)
    assert asm.missing() == [0, 1]
    assert store.partial_songs() == [big]
    for index in (0, 1):
        done = store.add_chunk(*chunk(big, DATA, index), now=2.0)
    assert done == (SONG, True)
    store.close()


def test_assembly_refuses_oversize_manifest(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB, max_song_bytes=2 * KIB)
    with pytest.raises(ProtocolError, match="over the limit of 2048"):
        store.assembly(manifest())
    with pytest.raises(ProtocolError, match="over the limit of 2048"):
        store.add_chunk(*chunk(manifest(), DATA, 0), now=1.0)
    assert store.partial_songs() == []
    store.close()


def test_default_chunk_size_transfer(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: 5 chunks of 256 KiB
    m = Manifest(sha224_bytes(data), len(data), DEFAULT_CHUNK_SIZE)
    assert m.n_chunks == 5
    store = SongStore(tmp_path, cap_bytes=10 * 1024 * KIB)
    results = [store.add_chunk(*chunk(m, data, i), now=1.0) for i in reversed(range(5))]
    assert results[-1] == (m.song, True)
    assert sha224_file(store.path(m.song)) == m.song
    store.close()


# -- whole-song uploads --------------------------------------------------------------------


def test_put_bytes_verifies_expected_hash(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    other = sha224_bytes(b"other")
    with pytest.raises(ProtocolError, match="hash mismatch"):
        store.put_bytes(DATA, other, now=1.0)
    assert store.songs() == []
    with pytest.raises(ProtocolError, match="expected song hash"):
        store.put_bytes(DATA, "not-a-hash", now=1.0)
    assert store.put_bytes(DATA, SONG, now=1.0) == SONG
    assert store.put_bytes(DATA, None, now=2.0) == SONG  # idempotent
    assert store.songs() == [SONG]
    assert store.total_bytes() == len(DATA)
    assert store.path(SONG).read_bytes() == DATA
    store.close()


def test_put_bytes_refuses_oversize_and_empty(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB, max_song_bytes=KIB)
    with pytest.raises(ProtocolError, match="over the limit of 1024"):
        store.put_bytes(DATA, None, now=1.0)
    with pytest.raises(ProtocolError, match="empty"):
        store.put_bytes(b"", None, now=1.0)
    assert store.songs() == []
    store.close()


def test_put_bytes_replaces_a_partial_transfer(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    store.add_chunk(*chunk(manifest(), DATA, 0), now=1.0)
    store.put_bytes(DATA, SONG, now=2.0)
    assert store.partial_songs() == []
    assert store.add_chunk(*chunk(manifest(), DATA, 1), now=3.0) == (SONG, False)
    store.close()


def test_meta_and_remove(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    store.put_bytes(DATA, None, now=1.0)
    assert store.meta(SONG) == {}
    store.set_meta(SONG, {"title": "Blue", "duration": 3.5})
    assert SongStore(tmp_path, cap_bytes=10 * KIB).meta(SONG) == {"title": "Blue", "duration": 3.5}
    store.remove(SONG)
    assert not store.has(SONG)
    assert store.meta(SONG) == {}
    assert not store.path(SONG).exists()
    with pytest.raises(SongMissing):
        store.size_of(SONG)
    store.close()


# -- LRU -----------------------------------------------------------------------------------


def test_choose_evictions_literal_cases() -> None:
    sizes = {"a": 100, "b": 100, "c": 100}
    used = {"a": 3.0, "b": 1.0, "c": 2.0}
    assert choose_evictions(sizes, used, (), 300) == []
    assert choose_evictions(sizes, used, (), 250) == ["b"]
    assert choose_evictions(sizes, used, (), 150) == ["b", "c"]
    assert choose_evictions(sizes, used, {"b"}, 150) == ["c", "a"]
    assert choose_evictions(sizes, used, {"a", "b", "c"}, 0) == []
    assert choose_evictions(sizes, used, {"a", "b"}, 0) == ["c"]
    # Never used counts as oldest; equal times fall back to hash order.
    assert choose_evictions({"x": 10, "y": 10, "z": 10}, {"x": 5.0}, (), 10) == ["y", "z"]
    assert choose_evictions({"b": 10, "a": 10}, {"a": 1.0, "b": 1.0}, (), 10) == ["a"]
    # Eviction stops as soon as the store fits, even if a large song is next.
    assert choose_evictions({"s": 10, "l": 500}, {"s": 1.0, "l": 2.0}, (), 500) == ["s"]


def test_evict_removes_oldest_unprotected_until_under_cap(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=2 * KIB)
    a = store.put_bytes(song_bytes(KIB, 1), None, now=1.0)
    b = store.put_bytes(song_bytes(KIB, 2), None, now=2.0)
    c = store.put_bytes(song_bytes(KIB, 3), None, now=3.0)
    d = store.put_bytes(song_bytes(KIB, 4), None, now=4.0)
    store.touch(a, now=5.0)
    assert store.evict(protected={b}, now=6.0) == [c, d]
    assert store.songs() == sorted([a, b])
    assert store.total_bytes() == 2 * KIB
    assert store.evict(protected=(), now=7.0) == []


def test_evict_never_removes_protected_even_over_cap(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=KIB)
    a = store.put_bytes(song_bytes(KIB, 1), None, now=1.0)
    b = store.put_bytes(song_bytes(KIB, 2), None, now=2.0)
    assert store.evict(protected={a, b}, now=3.0) == []
    assert store.total_bytes() == 2 * KIB
    # Protected songs were in use at the eviction, so once released they are the newest.
    c = store.put_bytes(song_bytes(KIB, 3), None, now=2.5)
    assert store.evict(protected=(), now=4.0) == [c, a]


def test_lru_order_survives_a_restart(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=KIB)
    a = store.put_bytes(song_bytes(KIB, 1), None, now=100.0)
    b = store.put_bytes(song_bytes(KIB, 2), None, now=200.0)
    store.touch(a, now=300.0)
    store.close()
    # A clock that restarted near zero still ranks this run's uses after the recorded ones.
    reopened = SongStore(tmp_path, cap_bytes=KIB)
    c = reopened.put_bytes(song_bytes(KIB, 3), None, now=0.5)
    assert reopened.evict(protected=(), now=1.0) == [b, a]
    assert reopened.songs() == [c]


# -- transfers in progress: bounded, counted in the cap, dropped when idle --------------------


def test_open_transfers_are_bounded(tmp_path: Path) -> None:
    from nsync_mqtt.replication import MAX_ASSEMBLIES

    store = SongStore(tmp_path, cap_bytes=10 << 20)
    songs = []
    for i in range(MAX_ASSEMBLIES + 3):
        data = song_bytes(2 * KIB, i)
        m = manifest(data)
        songs.append(m.song)
        header, body = chunk(m, data, 0)
        if i < MAX_ASSEMBLIES:
            store.add_chunk(header, body, now=float(i))
        else:  # refused; the open ones go on
            with pytest.raises(ProtocolError, match="too many transfers in progress"):
                store.add_chunk(header, body, now=float(i))
    assert {m.song for m in store.partial_songs()} == set(songs[:MAX_ASSEMBLIES])
    assert len(list((tmp_path / "partial").glob("*.part"))) == MAX_ASSEMBLIES
    data = song_bytes(2 * KIB, 0)
    m = manifest(data)
    header, body = chunk(m, data, 1)  # an open one completes, and makes room
    assert store.add_chunk(header, body, now=99.0) == (m.song, True)
    data = song_bytes(2 * KIB, MAX_ASSEMBLIES)
    header, body = chunk(manifest(data), data, 0)
    store.add_chunk(header, body, now=100.0)
    store.close()


def test_open_transfers_count_in_the_store_cap(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    big = song_bytes(6 * KIB, 1)
    other = song_bytes(6 * KIB, 2)
    h, b = chunk(manifest(big), big, 0)
    store.add_chunk(h, b, now=1.0)
    assert store.partial_bytes() == 6 * KIB
    h, b = chunk(manifest(other), other, 0)
    with pytest.raises(ProtocolError, match="no room for a 6144-byte transfer"):
        store.add_chunk(h, b, now=2.0)
    # a complete song is evicted to make room for what is being received
    small = song_bytes(5 * KIB, 3)
    song = store.put_bytes(small, None, now=3.0)
    assert store.evict(protected=(), now=4.0) == [song]
    store.close()


def test_an_idle_transfer_is_dropped_with_its_files(tmp_path: Path) -> None:
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    m = manifest()
    h, b = chunk(m, DATA, 0)
    store.add_chunk(h, b, now=100.0)
    assert store.prune_partials(now=150.0, idle_s=60.0) == []
    h, b = chunk(m, DATA, 1)
    store.add_chunk(h, b, now=150.0)  # fed again: its idle time starts over
    assert store.prune_partials(now=200.0, idle_s=60.0) == []
    assert store.prune_partials(now=210.0, idle_s=60.0) == [SONG]
    assert store.partial_songs() == [] and list((tmp_path / "partial").iterdir()) == []
    # a transfer resumed from disk without a chunk yet starts its idle time at the first look
    store.add_chunk(h, b, now=300.0)
    store.close()
    store = SongStore(tmp_path, cap_bytes=10 * KIB)
    store.assembly(m)
    assert store.prune_partials(now=5.0, idle_s=60.0) == []
    assert store.prune_partials(now=64.0, idle_s=60.0) == []
    assert store.prune_partials(now=65.0, idle_s=60.0) == [SONG]
    store.close()
