"""FAISS indexes over the train-split embeddings: cosine similarity as inner product on
L2-normalised float32 vectors, any `index_factory` string (exact "Flat" by default,
"HNSW32" / "IVF4096,Flat" / ... for millions of vectors). Vectors are added with their
sample_id, so searches return sample ids, never row positions.

One index per retrieval space (`SPACES`): cosine on the raw embeddings, on train-centred
ones, or on train-standardised ones. A non-raw index carries its shift and scale as a
FAISS pre-transform, so every index is searched with the raw query vectors."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from pipeline.artifacts import atomic_path
from pipeline.config import SPACES
from pipeline.errors import ArtifactError, ConfigError
from pipeline.features import FeatureNormalizer
from pipeline.lineage import Ref, ref

log = logging.getLogger(__name__)


def normalized(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 L2-normalised copy of x: (N, D)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def index_file(folder: str | Path, space: str) -> Path:
    """Where `lra index` writes the space's index: <folder>/<space>.faiss."""
    return Path(folder) / f"{space}.faiss"


ADD_ROWS = 65_536
"""Vectors added per `add_with_ids` call (the progress bar's step)."""


def build_index(embeddings: np.ndarray, ids: np.ndarray, *, factory: str,
                space: str = "raw", seed: int = 0, in_place: bool = False,
                progress: bool = False) -> faiss.Index:
    """Build an inner-product index of the L2-normalised `embeddings` (N, D) float32 in
    `space` (one of SPACES; its shift and scale fitted on these rows), labelled by `ids`
    (N,) int64. Trains the index first when the factory needs it (IVF, PQ), on all
    vectors, with a fixed clustering seed. in_place: transform and normalise the caller's
    C-contiguous float32 array itself instead of a copy (one (N, D) array less at the
    peak; the array is left changed). progress: a bar over the vectors added (in calls of
    ADD_ROWS, the same index whatever the bar)."""
    if space not in SPACES:
        raise ConfigError(f"index.spaces: unknown space {space!r}; valid: {', '.join(SPACES)}")
    if space != "raw":
        norm = FeatureNormalizer.fit(embeddings, space)
        x = embeddings if in_place else np.array(embeddings, dtype=np.float32, order="C")
        inner = build_index(norm.apply_inplace(x), ids, factory=factory, seed=seed,
                            in_place=True, progress=progress)
        return _with_pretransform(inner, norm)
    if in_place:
        if embeddings.dtype != np.float32 or not embeddings.flags.c_contiguous:
            raise TypeError("build_index(in_place=True) needs a C-contiguous float32 array")
        x = embeddings
        faiss.normalize_L2(x)
    else:
        x = normalized(embeddings)
    dim = x.shape[1]
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "invalid"
        raise ConfigError(f"index.factory: {factory!r} is not a valid FAISS index_factory "
                          f"string ({first}); e.g. Flat, HNSW32, IVF1024,Flat") from None
    if not base.is_trained:
        ivf = faiss.extract_index_ivf(base) if "IVF" in factory else None
        if ivf is not None:
            ivf.cp.seed = seed
            if ivf.nlist > len(x):
                raise ConfigError(f"index.factory: {factory!r} asks for {ivf.nlist} lists but "
                                  f"the train split has only {len(x)} vectors")
        base.train(x)
    from tqdm.auto import tqdm

    index = faiss.IndexIDMap2(base)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    with tqdm(total=len(x), unit="vec", desc="index", disable=not progress,
              dynamic_ncols=True) as bar:
        for start in range(0, len(x), ADD_ROWS):
            index.add_with_ids(x[start:start + ADD_ROWS], ids[start:start + ADD_ROWS])
            bar.update(min(ADD_ROWS, len(x) - start))
    return index


def _with_pretransform(inner: faiss.Index, norm: FeatureNormalizer) -> faiss.Index:
    """inner searched after x -> (x - mean) / std -> x / |x|: queries stay raw vectors.
    The (D, D) matrix is diagonal; FAISS's LinearTransform stores it dense."""
    dim = inner.d
    shift = faiss.LinearTransform(dim, dim, True)
    faiss.copy_array_to_vector(np.diag(1.0 / norm.std).astype(np.float32).ravel(), shift.A)
    faiss.copy_array_to_vector((-norm.mean / norm.std).astype(np.float32), shift.b)
    shift.is_trained = True
    index = faiss.IndexPreTransform(inner)
    index.prepend_transform(faiss.NormalizationTransform(dim, 2.0))
    index.prepend_transform(shift)
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index_info(folder: str | Path) -> dict:
    """<folder>/index.json (factory, dim, vectors, spaces: [{space, file, fingerprint}] in
    `index.spaces` order (a list: JSON objects are written with sorted keys),
    fingerprint over all spaces, built_from), checked to be this layout."""
    from pipeline.artifacts import read_json
    from pipeline.lineage import FINGERPRINT

    path = Path(folder) / "index.json"
    if not path.exists():
        raise ArtifactError(f"missing FAISS index info: {path} (run `lra index` first)")
    info = read_json(path, "FAISS index info", "lra index")
    if not info.get(FINGERPRINT) or not isinstance(info.get("spaces"), list):
        raise ArtifactError(f"{path} records no fingerprinted spaces (written by an older "
                            "version); rerun `lra index`")
    return info


def index_spaces(info: dict) -> tuple[str, ...]:
    """The indexed spaces in `index.spaces` order (the first is preferred on a tie)."""
    return tuple(entry["space"] for entry in info["spaces"])


def load_index_with_info(folder: str | Path, space: str) -> tuple[faiss.Index, dict]:
    """The space's index in `folder` and the folder's index.json (`read_index_info`).

    The file's bytes are checked against the fingerprint in index.json before FAISS
    reads them: a damaged Flat index would otherwise load with wrong vectors, and
    garbage in a header can make FAISS allocate without bound."""
    from pipeline.artifacts import damaged
    from pipeline.lineage import FINGERPRINT, file_fingerprint

    info = read_index_info(folder)
    record = {entry["space"]: entry for entry in info["spaces"]}.get(space)
    if record is None:
        raise ArtifactError(f"the index in {folder} has no {space!r} space (it has "
                            f"{', '.join(index_spaces(info))}); rerun `lra index`")
    path = index_file(folder, space)
    if not path.exists():
        raise ArtifactError(f"missing FAISS index: {path} (run `lra index` first)")
    if file_fingerprint(path) != record[FINGERPRINT]:
        raise damaged(path, "FAISS index", "lra index",
                      f"its bytes do not match the fingerprint in {Path(folder) / 'index.json'}")
    index = load_index(path)
    if (info.get("dim"), info.get("vectors")) != (index.d, index.ntotal):
        raise ArtifactError(f"index at {path} ({index.ntotal} vectors of dimension {index.d}) "
                            f"does not match its index.json ({info.get('vectors')} "
                            f"of dimension {info.get('dim')}); rerun `lra index`")
    return index, info


def index_ref(path: str | Path, info: dict) -> Ref:
    """The index folder as lineage checks see it (`read_index_info`'s info): one
    fingerprint over all its spaces."""
    return ref("index", "FAISS index", path, "lra index", info, rows=info.get("vectors"),
               dim=info.get("dim"))


def load_index(path: str | Path) -> faiss.Index:
    """Read a FAISS index; a missing or unreadable file is an ArtifactError naming the
    stage that rebuilds it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing FAISS index: {path} (run `lra index` first)")
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as exc:
        from pipeline.artifacts import damaged

        raise damaged(path, "FAISS index", "lra index", exc) from None


def apply_search_params(index: faiss.Index, params: str) -> None:
    """Set search-time parameters such as "nprobe=64" or "efSearch=128"."""
    if params.strip():
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise ConfigError(f"index.search_params: {params!r} does not apply to this "
                              f"index ({str(exc).strip().splitlines()[-1]})") from None


def search(index: faiss.Index, queries: np.ndarray, k: int, *, chunk_rows: int = 65_536
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine search of `queries` (M, D) float32, in chunks to bound memory: the
    queries are L2-normalised here, or, for a non-raw space's index, by its own
    pre-transform after the shift. Returns (similarities (M, k) float32, ids (M, k)
    int64), best first."""
    if queries.shape[1] != index.d:
        raise ArtifactError(f"embedding dimension {queries.shape[1]} does not match the "
                            f"index dimension {index.d}; rerun `lra index`")
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk_rows):
        q = queries[start:start + chunk_rows]
        q = (np.ascontiguousarray(q, dtype=np.float32)
             if isinstance(index, faiss.IndexPreTransform) else normalized(q))
        sims[start:start + len(q)], ids[start:start + len(q)] = index.search(q, k)
    return sims, ids
