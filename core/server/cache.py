"""A thread-safe LRU of slice embeddings, bounded in bytes and shared by every session of a server."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from samadapt.predictor import ImageEmbedding

__all__ = ["EmbeddingCache", "embedding_bytes"]


def embedding_bytes(embedding: ImageEmbedding) -> int:
    """Bytes held by one embedding: the (1, 256, 64, 64) tensor plus any kept features and image."""
    total = embedding.embedding.numel() * embedding.embedding.element_size()
    for feature in embedding.features:
        total += feature.numel() * feature.element_size()
    if embedding.image is not None:
        total += embedding.image.numel() * embedding.image.element_size()
    return int(total)


class EmbeddingCache:
    """Least-recently-used embeddings, at most ``max_bytes`` in all.

    Keys are ``(session id, axis, slice index)``. Adding an entry evicts the least recently used ones
    until the total fits; one entry larger than the bound is not kept at all (the caller still has
    it). Hits, misses and evictions are counted for ``/capabilities`` and the tests.

    Args:
        max_bytes: the bound (0 disables caching).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[Hashable, tuple[ImageEmbedding, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> ImageEmbedding | None:
        """The cached embedding (now most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, embedding: ImageEmbedding) -> None:
        """Add or replace an entry, evicting least recently used entries to stay within the bound."""
        size = embedding_bytes(embedding)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return
            while self._items and self.bytes + size > self.max_bytes:
                _, (_, freed) = self._items.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1
            self._items[key] = (embedding, size)
            self.bytes += size

    def drop(self, prefix: Hashable) -> int:
        """Remove every entry whose key starts with ``prefix`` (a session id); returns how many."""
        with self._lock:
            doomed = [k for k in self._items if isinstance(k, tuple) and k and k[0] == prefix]
            for key in doomed:
                self.bytes -= self._items.pop(key)[1]
            return len(doomed)

    def count(self, prefix: Hashable | None = None) -> int:
        """Entries held (of one session when ``prefix`` is given)."""
        with self._lock:
            if prefix is None:
                return len(self._items)
            return sum(1 for k in self._items if isinstance(k, tuple) and k and k[0] == prefix)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "max_bytes": self.max_bytes,
                "bytes": self.bytes,
                "entries": len(self._items),
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
