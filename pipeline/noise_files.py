"""Reading externally supplied noisy labels (`noise.kind: file`, and hybrid's PMD step
from a released label file): the paper's .npy noise files, CIFAR-N's .pt dicts, pickles,
.npz archives, and sample_id,label tables (CSV or Parquet, `lra export`'s manifest among
them). `read_noise_file` is the entry point; every problem is a one-line ArtifactError.
Pickled content goes through restricted unpicklers that build arrays and nothing else.
"""

from __future__ import annotations

import codecs
import collections
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError

logger = logging.getLogger(__name__)

FILE_FORMATS = (".npy", ".npz", ".csv", ".parquet", ".pq", ".pt", ".pth", ".pkl", ".pickle")

def read_noise_file(spec: str, *, n: int, num_classes: int,
                    sample_ids: np.ndarray | None = None) -> np.ndarray:
    """Observed train labels from an external file. Returns (n,) int64 in [0, C).

    spec: a path (relative to the working directory), optionally followed by "#key" to
    pick one entry of a file holding a dict of label arrays, e.g.
    "CIFAR-10_human.pt#worse_label" (CIFAR-10N keys: aggre_label, worse_label,
    random_label1..3, clean_label; CIFAR-100N: noisy_label). The "#" split applies only
    when the whole string is not an existing file.

    Formats, by suffix:
      .npy          an int array (the paper's released noise files), or a pickled dict
                    saved with np.save (read with an unpickler that only builds arrays)
      .npz          arrays by name (needs "#key" unless it holds exactly one array)
      .pt / .pth    a torch-saved dict or array (CIFAR-N's files); torch.load with
                    weights_only=True plus the NumPy array types, never arbitrary code
      .pkl/.pickle  a pickled dict or array (same restricted unpickler as .npy)
      .csv, .parquet / .pq
                    a table with `sample_id` and `label` columns (others ignored, so
                    `lra export`'s manifest is one), one row per sample; must cover
                    every given sample id exactly once (extra ids allowed)

    An array of length n is positional: element i is the label of train row i. A longer
    array is indexed by `sample_ids` (e.g. CIFAR-10N's 50,000 labels while the train
    split holds the first 45,000 images), which assumes sample_id = index in the file.
    Labels must be integers in [0, C). Every problem raises a one-line ArtifactError.
    """
    path, key = _split_key(spec)
    if not path.is_file():
        raise ArtifactError(f"noise.file: {path} does not exist")
    try:
        return _read_noise_file(path, key, n=n, num_classes=num_classes, sample_ids=sample_ids)
    except (UnicodeDecodeError, EOFError, OSError) as exc:  # a damaged file
        raise ArtifactError(f"noise.file: {path} cannot be read ({type(exc).__name__}: "
                            f"{one_line(exc)})") from None


def _read_noise_file(path: Path, key: str | None, *, n: int, num_classes: int,
                     sample_ids: np.ndarray | None) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        return _read_id_labels(path, n=n, num_classes=num_classes, sample_ids=sample_ids)
    if suffix == ".npy":
        obj = _load_npy(path)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                obj = {name: archive[name] for name in archive.files}
        except Exception as exc:  # noqa: BLE001 - any read failure is bad data
            raise ArtifactError(f"noise.file: {path} is not a readable .npz file "
                                f"({type(exc).__name__}: {one_line(exc)})") from None
        if key is None and len(obj) == 1:
            obj = next(iter(obj.values()))
    elif suffix in (".pt", ".pth"):
        obj = _load_torch(path)
    elif suffix in (".pkl", ".pickle"):
        with path.open("rb") as fh:
            obj = _safe_unpickle(fh, path)
    else:
        raise ArtifactError(f"noise.file: {path} has unsupported suffix {suffix!r}; "
                            f"valid: {', '.join(FILE_FORMATS)}")
    labels = _pick_key(obj, key, path)
    return _check_file_labels(labels, path, n=n, num_classes=num_classes,
                              sample_ids=sample_ids)


def _split_key(spec: str) -> tuple[Path, str | None]:
    """'path#key' -> (path, key); a plain existing path keeps any '#' it contains."""
    if Path(spec).is_file() or "#" not in spec:
        return Path(spec), None
    head, _, key = spec.rpartition("#")
    return Path(head), (key or None)


def _pick_key(obj: Any, key: str | None, path: Path) -> Any:
    if isinstance(obj, Mapping):
        keys = ", ".join(str(k) for k in obj)
        if key is None:
            raise ArtifactError(f"noise.file: {path} holds a dict; pick one entry with "
                                f"'{path}#KEY'; keys: {keys}")
        if key not in obj:
            raise ArtifactError(f"noise.file: key {key!r} not in {path}; keys: {keys}")
        return obj[key]
    if key is not None:
        raise ArtifactError(f"noise.file: {path} holds a single array, not a dict; "
                            f"drop '#{key}'")
    return obj


def _check_file_labels(labels: Any, path: Path, *, n: int, num_classes: int,
                       sample_ids: np.ndarray | None) -> np.ndarray:
    try:
        arr = np.asarray(labels)  # also converts CPU torch tensors and lists
    except Exception:  # noqa: BLE001
        raise ArtifactError(f"noise.file: {path} holds a {type(labels).__name__}, "
                            "not an array of labels") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ArtifactError(f"noise.file: {path} holds an array of shape {arr.shape}; "
                            "expected a 1-D array of labels")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ArtifactError(f"noise.file: {path} holds labels of dtype {arr.dtype}; "
                            "expected integers")
    if len(arr) != n:
        ids = None if sample_ids is None else np.asarray(sample_ids)
        if (ids is None or len(ids) != n or ids.size == 0
                or ids.min() < 0 or ids.max() >= len(arr) or len(arr) < n):
            raise ArtifactError(f"noise.file: {path} holds {len(arr)} labels but the train "
                                f"split has {n} rows (and they cannot be indexed by "
                                "sample id)")
        logger.info("noise file %s: %d labels, indexed by the %d train sample ids",
                    path, len(arr), n)
        arr = arr[ids]
    return check_range(arr.astype(np.int64), num_classes, f"noise.file: {path}")


def _id_label_columns(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The sample_id and label columns (names matched case-insensitively) of a CSV or
    Parquet table, as (rows,) int64 arrays; one-line errors for anything else."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    parquet = path.suffix.lower() in (".parquet", ".pq")
    try:
        names = pq.read_schema(path).names if parquet else pacsv.open_csv(path).schema.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"noise.file: {path} is not a readable "
                            f"{'Parquet' if parquet else 'CSV'} table ({one_line(exc)})") from None
    by_lower = {name.strip().lower(): name for name in names}
    if "sample_id" not in by_lower or "label" not in by_lower:
        raise ArtifactError(f"noise.file: {path} header {','.join(names)!r} lacks the "
                            "columns sample_id and label")
    cols = [by_lower["sample_id"], by_lower["label"]]
    try:
        if parquet:
            table = pq.read_table(path, columns=cols)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                include_columns=cols, column_types={c: pa.int64() for c in cols}))
        out = [table.column(c).cast(pa.int64()) for c in cols]  # safe: 1.5 is refused
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ArtifactError(f"noise.file: {path} has a row that is not integer "
                            f"sample_id,label ({one_line(exc)})") from None
    if any(col.null_count for col in out):
        raise ArtifactError(f"noise.file: {path} has an empty sample_id or label")
    return tuple(col.to_numpy() for col in out)


def _read_id_labels(path: Path, *, n: int, num_classes: int,
                    sample_ids: np.ndarray | None) -> np.ndarray:
    """A sample_id,label table (CSV with any quoting, or Parquet; other columns ignored,
    so `lra export`'s manifest is one) mapped onto the n train sample ids."""
    if sample_ids is None:
        raise ArtifactError(f"noise.file: {path} is a sample_id,label table, which needs the "
                            "train sample ids")
    ids = np.asarray(sample_ids, dtype=np.int64)
    if ids.shape != (n,):
        raise ArtifactError(f"noise.file: got {ids.shape} sample ids for {n} train rows")
    file_ids, file_labels = _id_label_columns(path)
    order = np.argsort(file_ids, kind="stable")
    sorted_ids = file_ids[order]
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if dup.size:
        raise ArtifactError(f"noise.file: {path} lists sample id {int(dup[0])} more than once "
                            f"({np.unique(dup).size} duplicated ids)")
    pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(n, dtype=bool)
    if not found.all():
        missing = ids[~found]
        example = ", ".join(str(int(i)) for i in missing[:5])
        raise ArtifactError(f"noise.file: {path} misses {missing.size} of the {n} train "
                            f"sample ids (e.g. {example})")
    if len(sorted_ids) > n:
        logger.info("noise file %s: %d rows for ids outside the train split are ignored",
                    path, len(sorted_ids) - n)
    labels = file_labels[order][pos]
    return check_range(labels, num_classes, f"noise.file: {path}")


def _load_npy(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise ArtifactError(f"noise.file: {path} is not a readable .npy file "
                                f"({one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"noise.file: {path} is not a readable .npy file "
                            f"({type(exc).__name__}: {one_line(exc)})") from None
    # An object array (np.save of a dict): the body after the header is a pickle, which
    # we read with the restricted unpickler instead of allow_pickle=True.
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(fh)
        else:
            np.lib.format.read_array_header_2_0(fh)
        obj = _safe_unpickle(fh, path)
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()  # np.save(dict) wraps the dict in a 0-d object array
    return obj


def _array_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickled dict of NumPy arrays needs, under both the NumPy 1
    (numpy.core) and NumPy 2 (numpy._core) module names."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts / lists of NumPy arrays and plain values, nothing executable."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _array_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def _safe_unpickle(fh: Any, path: Path) -> Any:
    try:
        return _ArrayUnpickler(fh).load()
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"noise.file: {path} could not be unpickled as arrays "
                            f"({type(exc).__name__}: {one_line(exc)})") from None


def _load_torch(path: Path) -> Any:
    import numpy.dtypes
    import torch  # lazy: only CIFAR-N style .pt files need it

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.int64(0).__reduce__()[0]
    dtype_classes = [c for c in vars(numpy.dtypes).values()
                     if isinstance(c, type) and issubclass(c, np.dtype)]
    safe = [np.ndarray, np.dtype, reconstruct, scalar, *dtype_classes,
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            (scalar, "numpy.core.multiarray.scalar")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        text = one_line(exc)
        # torch's message is long; keep the part that names the refused global.
        found = re.search(r"GLOBAL [\w.]+|got <class '[^']+'>", text)
        detail = f"refused {found.group(0)}" if found else text[:200]
        raise ArtifactError(f"noise.file: {path} could not be loaded as a torch file of "
                            f"arrays ({type(exc).__name__}: {detail})") from None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def check_range(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ArtifactError(f"{where}: label {int(labels[i])} at row {i} is outside "
                            f"[0, {num_classes}) ({bad.size} such rows)")
    return labels
