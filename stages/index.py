"""`lra index`: train-split embeddings -> data/index/train.faiss (+ index.json)."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import StageWriter, write_json
from pipeline.errors import ArtifactError
from pipeline.index import build_index, save_index
from pipeline.lineage import BUILT_FROM, FINGERPRINT, file_fingerprint
from pipeline.tables import open_embeddings
from stages.app import (EmbeddingsOption, OutDirOption, ParamsOption, ProgressOption,
                        ThreadsOption, app, set_threads, stage)


@app.command()
def index(params: ParamsOption = Path("params.yaml"),
          embeddings: EmbeddingsOption = Path("data/embeddings/embeddings.parquet"),
          out_dir: OutDirOption = Path("data/index"), threads: ThreadsOption = 0,
          progress: ProgressOption = True) -> None:
    """Build the FAISS index (index.factory) over the train split."""
    with stage("index", params) as p:
        set_threads(threads, libraries=("faiss",))  # no torch here
        emb = open_embeddings(embeddings)
        built_from = {"embeddings": emb.ref().stamp()}
        train = emb.rows("train")
        if len(train) == 0:
            raise ArtifactError(f"embeddings at {embeddings} have no train-split rows")
        # Only the train rows are read, and normalised in place: the peak is those rows
        # plus the index's own copy.
        idx = build_index(emb.read_rows(train), emb.sample_id[train], factory=p.index.factory,
                          in_place=True, progress=progress)
        with StageWriter() as out:
            faiss_path = out.path(out_dir / "train.faiss")
            save_index(idx, faiss_path)
            write_json({"factory": p.index.factory, "metric": "inner_product_l2_normalised",
                        "dim": emb.dim, "vectors": int(idx.ntotal),
                        "encoder": emb.meta.get("encoder"), "model": emb.meta.get("model"),
                        FINGERPRINT: file_fingerprint(faiss_path),
                        BUILT_FROM: built_from},
                       out.path(out_dir / "index.json"))
