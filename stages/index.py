"""`lra index`: train-split embeddings -> data/index/<space>.faiss (+ index.json)."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import StageWriter, write_json
from pipeline.errors import ArtifactError
from pipeline.index import build_index, index_file, save_index
from pipeline.lineage import BUILT_FROM, FINGERPRINT, file_fingerprint, fingerprint_of
from pipeline.tables import open_embeddings
from stages.app import (EmbeddingsOption, OutDirOption, ParamsOption, ProgressOption,
                        ThreadsOption, app, set_threads, stage)


@app.command()
def index(params: ParamsOption = Path("params.yaml"),
          embeddings: EmbeddingsOption = Path("data/embeddings/embeddings.parquet"),
          out_dir: OutDirOption = Path("data/index"), threads: ThreadsOption = 0,
          progress: ProgressOption = True) -> None:
    """Build one FAISS index (index.factory) over the train split per retrieval space
    (index.spaces)."""
    with stage("index", params) as p:
        set_threads(threads, libraries=("faiss",))  # no torch here
        emb = open_embeddings(embeddings)
        built_from = {"embeddings": emb.ref().stamp()}
        train = emb.rows("train")
        if len(train) == 0:
            raise ArtifactError(f"embeddings at {embeddings} have no train-split rows")
        vectors = emb.read_rows(train)
        spaces = p.index.space_names
        last = spaces[-1]
        with StageWriter() as out:
            files = []
            for space in spaces:
                # The last space transforms the rows in place: the peak is the rows, one
                # transformed copy and the indexes.
                idx = build_index(vectors, emb.sample_id[train], factory=p.index.factory,
                                  space=space, in_place=space == last, progress=progress)
                path = out.path(index_file(out_dir, space))
                save_index(idx, path)
                files.append({"space": space, "file": index_file(out_dir, space).name,
                              FINGERPRINT: file_fingerprint(path)})
                del idx
            # Files of spaces no longer listed are left out of index.json, so never read.
            write_json({"factory": p.index.factory, "metric": "inner_product_l2_normalised",
                        "dim": emb.dim, "vectors": len(train),
                        "encoder": emb.meta.get("encoder"), "model": emb.meta.get("model"),
                        "spaces": files,
                        FINGERPRINT: fingerprint_of(*(f[FINGERPRINT] for f in files)),
                        BUILT_FROM: built_from},
                       out.path(out_dir / "index.json"))
        for stale in set(out_dir.glob("*.faiss")) - {out_dir / f["file"] for f in files}:
            stale.unlink()  # a space dropped from index.spaces, or the old train.faiss
