"""An in-memory song library for the pure roles (unit tests and the simulator).

It plays the part of the node's song store and PCM cache as :class:`nsync_mqtt.speaker.Library`
sees them: which songs are held, their tags, size and decoded length, and the chunks received of
songs in transfer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from nsync_mqtt.playlist import RATE
from nsync_mqtt.replication import Manifest


@dataclass
class MemoryLibrary:
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # song -> meta (size, frames)
    partial: dict[str, tuple[Manifest, set[int]]] = field(default_factory=dict)
    decoded: set[str] = field(default_factory=set)

    def add(self, song: str, size: int = 1000, seconds: float = 60.0, title: str = "") -> None:
        """Hold ``song`` whole and decoded."""
        frames = int(seconds * RATE)
        self.held[song] = {"size": size, "frames": frames, "duration_s": seconds, "title": title}
        self.decoded.add(song)
        self.partial.pop(song, None)

    def remove(self, song: str) -> None:
        self.held.pop(song, None)
        self.decoded.discard(song)

    def has(self, song: str) -> bool:
        return song in self.held

    def songs(self) -> list[str]:
        return sorted(self.held)

    def meta(self, song: str) -> dict[str, Any]:
        meta = self.held.get(song, {})
        return {k: v for k, v in meta.items() if v != ""}

    def size_of(self, song: str) -> int:
        return int(self.held[song]["size"]) if song in self.held else self.partial[song][0].size

    def frames(self, song: str) -> int | None:
        return int(self.held[song]["frames"]) if song in self.decoded else None

    def missing_chunks(self, songs: Collection[str]) -> dict[str, list[int]]:
        out = {}
        for song, (manifest, have) in sorted(self.partial.items()):
            if song in songs:
                out[song] = [i for i in range(manifest.n_chunks) if i not in have]
        return out

    def assembly_missing(self, manifest: Manifest) -> list[int]:
        _, have = self.partial.setdefault(manifest.song, (manifest, set()))
        return [i for i in range(manifest.n_chunks) if i not in have]

    def received_count(self, manifest: Manifest) -> int:
        entry = self.partial.get(manifest.song)
        return (
            manifest.n_chunks
            if entry is None and self.has(manifest.song)
            else len(entry[1] if entry else ())
        )

    def sniff(self, song: str) -> str | None:
        return "wav" if song in self.held else None
