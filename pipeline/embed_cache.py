"""Resumable, shardable embedding: the prepared table is embedded in fixed chunks of rows,
each chunk saved to a cache outside DVC's outs as soon as it is done, so a killed run
resumes where it stopped and several processes (torchrun ranks) can share the work.

Layout: <cache_root>/embed/<key>/
    key.json                       what the key was computed from (for people)
    provenance.json                the encoder's provenance (written with the first chunk)
    rows-<start>-<stop>.npy        (stop - start, D) float32, rows [start, stop)

key = sha256 of: the encoder's fingerprint (encoder, model, weights, and for CLIP the
device type, GPU model, batch size, library versions: everything besides the images that
decides the numbers), a hash of the encoder's source code, NumPy / Pillow versions, and
the image list (per row: sample_id and the image bytes, or the path with its file size and
mtime). Anything that could change an embedding changes the key, so a stale chunk is
never reused; an old key's folder is simply never read again.

Chunks are written atomically (temporary file + rename). At start every existing chunk
is checked (header, shape, dtype); a missing or unreadable one is recomputed. The chunk
size is a runtime knob: chunks are named by their row range, and for per-image encoders
(pixels, open_clip in eval mode) a row's embedding does not depend on its neighbours; the
chunk size is rounded up to a multiple of the batch size so that batches are the same as
in one whole-table pass (batched kernels may round differently for another batch shape).
The final array is assembled in row order, so the output Parquet is byte-identical
whatever the chunking, the number of ranks or the number of interruptions.

Several processes (pipeline.distributed): rank 0 computes the key and lists the missing
chunks; they are dealt round-robin over the ranks (missing chunk j to rank j % world), each
rank saves its chunks to the cache, all meet at a barrier, and rank 0 assembles. With a
cache on a shared filesystem nothing else moves; without one, rank 0 receives the chunks
it cannot see from their ranks over the process group (gloo), so a multi-node run works
either way.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import distributed
from pipeline.artifacts import atomic_path
from pipeline.distributed import DistContext
from pipeline.encoders import Encoder, RuntimeOptions, iter_encode
from pipeline.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_CACHE_ROOT = Path(".lra-cache")
"""Cache root (git-ignored); chunks go to <root>/embed/<key>/."""
DEFAULT_CHUNK_ROWS = 4096
FORMAT = 1  # bump when the chunk layout changes: old caches then miss


# --------------------------------------------------------------------------- chunks
def chunk_ranges(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `chunk_rows` rows covering 0..n (the last may be short)."""
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows: {chunk_rows} must be >= 1")
    return [(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]


def aligned_chunk_rows(chunk_rows: int, batch_size: int) -> int:
    """`chunk_rows` rounded up to a multiple of `batch_size` (same batches as one pass)."""
    if chunk_rows < 1 or batch_size < 1:
        raise ConfigError(f"chunk_rows ({chunk_rows}) and batch_size ({batch_size}) must "
                          "be >= 1")
    return -(-chunk_rows // batch_size) * batch_size


class ChunkStore:
    """One key's folder of chunk files. Every write is atomic."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, start: int, stop: int) -> Path:
        return self.directory / f"rows-{start:012d}-{stop:012d}.npy"

    def probe(self, start: int, stop: int) -> bool:
        """True when the chunk file exists and its header says (stop - start, D) float32
        with the whole payload present (memory-mapped: no data read)."""
        path = self.path(start, stop)
        if not path.is_file():
            return False
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return False
        return arr.ndim == 2 and arr.shape[0] == stop - start and arr.dtype == np.float32

    def load(self, start: int, stop: int) -> np.ndarray | None:
        """The chunk as a (stop - start, D) float32 array, or None when missing / bad."""
        path = self.path(start, stop)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError) as exc:
            log.warning("ignoring unreadable cache chunk %s (%s)", path, exc)
            return None
        if arr.ndim != 2 or arr.shape[0] != stop - start or arr.dtype != np.float32:
            log.warning("ignoring cache chunk %s: shape %s %s, expected (%d, D) float32",
                        path, arr.shape, arr.dtype, stop - start)
            return None
        return arr

    def save(self, start: int, stop: int, array: np.ndarray) -> None:
        if array.shape[0] != stop - start or array.ndim != 2:
            raise ValueError(f"chunk [{start}, {stop}) got an array of shape {array.shape}")
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(start, stop)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, data: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.directory / name) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")

    def read_json(self, name: str) -> Any | None:
        try:
            return json.loads((self.directory / name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def remove(self) -> None:
        """Delete this key's folder, then <root>/embed and <root> if that left them empty."""
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.directory.parent.name == "embed":
            for parent in (self.directory.parent, self.directory.parent.parent):
                try:
                    parent.rmdir()  # only succeeds when empty
                except OSError:
                    break


# --------------------------------------------------------------------------- key
def images_digest(table: pa.Table, root: str | None) -> str:
    """sha256 over the rows' (sample_id, image bytes | path + size + mtime) in order."""
    h = hashlib.sha256()
    h.update(f"rows={table.num_rows};".encode())
    cols = table.select(["sample_id", "image", "path"])
    for batch in cols.to_batches(max_chunksize=8192):
        ids = batch.column(0).to_numpy(zero_copy_only=False).astype("<i8")
        h.update(ids.tobytes())
        for image, path in zip(batch.column(1).to_pylist(), batch.column(2).to_pylist()):
            if image is not None:
                h.update(b"B%d:" % len(image))
                h.update(image)
            elif path is not None:
                full = Path(root) / path if root is not None else Path(path)
                try:
                    st = os.stat(full)
                    stamp = b"%d:%d" % (st.st_size, st.st_mtime_ns)
                except OSError:
                    stamp = b"missing"
                raw = path.encode()
                h.update(b"P%d:" % len(raw) + raw + b"|" + stamp + b";")
            else:
                h.update(b"N;")
    return h.hexdigest()


def _source_digest(encoder: Encoder) -> str:
    """sha256 of the encoder's module source and pipeline/images.py (decoding)."""
    from pipeline import images

    h = hashlib.sha256()
    for obj in (type(encoder), images):
        try:
            h.update(Path(inspect.getsourcefile(obj) or "").read_bytes())
        except (OSError, TypeError):
            h.update(type(encoder).__qualname__.encode())
    return h.hexdigest()


def cache_key(encoder: Encoder, table: pa.Table, *, root: str | None,
              runtime: RuntimeOptions) -> tuple[str, dict[str, Any]]:
    """(hex key, what it was computed from)."""
    import PIL

    fingerprint = (encoder.fingerprint(runtime) if hasattr(encoder, "fingerprint")
                   else {"encoder": f"{type(encoder).__module__}.{type(encoder).__qualname__}"})
    described = {"format": FORMAT, "encoder": fingerprint, "code": _source_digest(encoder),
                 "numpy": np.__version__, "pillow": PIL.__version__,
                 "rows": table.num_rows, "images": images_digest(table, root)}
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return key, described


# --------------------------------------------------------------------------- embed
@dataclass
class EmbedResult:
    """vectors: (N, D) float32 in table row order and provenance, on rank 0 only (None
    elsewhere); store: the key's chunk folder; computed / reused: chunk counts (this
    rank computed / found in the cache)."""

    vectors: np.ndarray | None
    provenance: dict[str, Any] | None
    store: ChunkStore | None = None
    computed: int = 0
    reused: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)


def _compute(encoder: Encoder, table: pa.Table, todo: Sequence[tuple[int, int]],
             store: ChunkStore, *, root: str | None, runtime: RuntimeOptions) -> int:
    """Embed the ranges in `todo`, saving each chunk as soon as it is done."""
    count = 0
    for (start, stop), vectors in zip(todo, iter_encode(encoder, table, todo, root=root,
                                                        runtime=runtime)):
        store.save(start, stop, vectors)
        if count == 0 and not (store.directory / "provenance.json").is_file():
            store.write_json("provenance.json", encoder.provenance())
        count += 1
        log.debug("chunk rows %d..%d saved", start, stop - 1)
    return count


def _gather_absent(absent: list[tuple[int, int]], owner: dict[tuple[int, int], int],
                   store: ChunkStore, ctx: DistContext) -> None:
    """Chunks rank 0 cannot see (no shared filesystem): each owner sends its copy."""
    for rng in absent:
        src = owner[rng]
        if ctx.rank == src:
            arr = store.load(*rng)
            distributed.send_object((arr, store.read_json("provenance.json")), ctx, dst=0)
        elif ctx.is_main:
            arr, provenance = distributed.recv_object(ctx, src=src)
            if arr is not None:
                store.save(*rng, arr)
                if provenance is not None and store.read_json("provenance.json") is None:
                    store.write_json("provenance.json", provenance)


def embed_table(encoder: Encoder, table: pa.Table, *, root: str | None,
                runtime: RuntimeOptions, cache_root: str | Path = DEFAULT_CACHE_ROOT,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, ctx: DistContext | None = None
                ) -> EmbedResult:
    """Embed every row of the prepared `table` through the chunk cache.

    Returns the (N, D) float32 embeddings in row order and the provenance on rank 0
    (byte-for-byte what `encoder.encode(table)` returns, for per-image encoders); other
    ranks get vectors=None after doing their share. Call on every rank with the same table.
    """
    ctx = ctx or DistContext()
    n = table.num_rows
    if n == 0:  # nothing to chunk: the encoder says what an empty result looks like
        vectors = encoder.encode(table, root=root, runtime=runtime) if ctx.is_main else None
        return EmbedResult(vectors, encoder.provenance() if ctx.is_main else None)
    if getattr(encoder, "per_image", False):
        rows = aligned_chunk_rows(chunk_rows, runtime.batch_size)
        if rows != chunk_rows and ctx.is_main:
            log.info("chunk size %d rounded up to %d, a multiple of the batch size %d",
                     chunk_rows, rows, runtime.batch_size)
    else:
        rows = n  # whole-table encoder: one chunk (still resumable, not shardable)
    ranges = chunk_ranges(n, rows)

    plan = None
    if ctx.is_main:
        key, described = cache_key(encoder, table, root=root, runtime=runtime)
        store = ChunkStore(Path(cache_root) / "embed" / key)
        if store.read_json("key.json") is None:
            store.write_json("key.json", described)
        missing = [r for r in ranges if not store.probe(*r)]
        plan = (key, missing)
        log.info("embedding %d rows in %d chunk(s) of %d: %d cached, %d to compute%s "
                 "(cache %s)", n, len(ranges), rows, len(ranges) - len(missing), len(missing),
                 f" on {ctx.world_size} processes" if ctx.enabled else "", store.directory)
    key, missing = distributed.broadcast_object(plan, ctx)
    store = ChunkStore(Path(cache_root) / "embed" / key)  # this rank's cache root
    owner = {r: j % ctx.world_size for j, r in enumerate(missing)}
    mine = [r for r in missing if owner[r] == ctx.rank]
    todo = [r for r in mine if ctx.is_main or not store.probe(*r)]  # others: a local copy?
    computed = _compute(encoder, table, todo, store, root=root, runtime=runtime)
    distributed.barrier(ctx)

    if ctx.enabled:  # chunks rank 0 cannot see: no shared filesystem
        absent = [r for r in missing if not store.probe(*r)] if ctx.is_main else None
        absent = distributed.broadcast_object(absent, ctx)
        if absent and ctx.is_main:
            log.info("%d chunk(s) not visible on rank 0 (cache not on a shared "
                     "filesystem?): receiving them from their ranks", len(absent))
        _gather_absent(absent, owner, store, ctx)
    if not ctx.is_main:
        return EmbedResult(None, None, store, computed, len(ranges) - len(missing), ranges)

    out: np.ndarray | None = None
    first: tuple[int, int] | None = None
    for start, stop in ranges:
        chunk = store.load(start, stop)
        if chunk is None:  # vanished or corrupted since the probe: compute it here
            log.warning("chunk rows %d..%d missing at assembly: computing it", start, stop - 1)
            computed += _compute(encoder, table, [(start, stop)], store, root=root,
                                 runtime=runtime)
            chunk = store.load(start, stop)
            if chunk is None:
                raise ArtifactError(f"embedding cache {store.directory}: cannot write or read "
                                    f"chunk rows {start}..{stop - 1}")
        if out is None:
            out = np.empty((n, chunk.shape[1]), dtype=np.float32)  # (N, D)
            first = (start, stop)
        elif chunk.shape[1] != out.shape[1]:
            raise ArtifactError(
                f"the encoder gave {out.shape[1]}-d embeddings for rows {first[0]}..{first[1] - 1}"
                f" but {chunk.shape[1]}-d for rows {start}..{stop - 1} (the pixels encoder "
                "needs images of one size and mode)")
        out[start:stop] = chunk
    provenance = store.read_json("provenance.json")
    if provenance is None:
        provenance = encoder.provenance()
    reused = len(ranges) - len(missing)
    log.info("embedded %d rows: %d chunk(s) computed here, %d reused from the cache", n,
             computed, reused)
    return EmbedResult(out, provenance, store, computed, reused, ranges)


def release(result: EmbedResult, ctx: DistContext | None = None, *, keep: bool = False
            ) -> None:
    """After the output is written: wait for every rank, then delete the key's chunks
    (unless `keep`); DVC's cache holds the result from now on."""
    ctx = ctx or DistContext()
    distributed.barrier(ctx)
    if result.store is not None and not keep:
        result.store.remove()
