import json

import numpy as np
import pytest
from api_helpers import gradient, save_checkpoint, synthetic_shards

import clip_med
from clip_med.eval.retrieval import recall_at_k
from clip_med.inference.commands import SearchConfig, format_search, run_search
from clip_med.inference.extract import ExtractConfig, extract
from clip_med.inference.index import IndexConfig, IndexFolderError, SearchIndex, build_index, paired_recall


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(queries, vectors, k):
    scores = queries @ vectors.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_exact_index_is_numpy_brute_force():
    vectors, queries = _unit(500, 32, 0), _unit(20, 32, 1)
    index = SearchIndex.from_embeddings(vectors, kind="flat")
    scores, positions = index.search_vectors(queries, 10)
    assert np.array_equal(positions, _brute_force(queries, vectors, 10))
    assert np.allclose(scores, np.take_along_axis(queries @ vectors.T, positions, axis=1), atol=1e-5)


def test_approximate_indexes():
    vectors, queries = _unit(2000, 32, 0), _unit(50, 32, 1)
    exact = _brute_force(queries, vectors, 10)
    ivf, factory = build_index(vectors, cfg=IndexConfig(kind="ivf", nlist=16, nprobe=16))
    assert factory == "IVF16,Flat"
    assert np.array_equal(ivf.search(queries, 10)[1], exact)  # every cell visited: exact
    hnsw, _ = build_index(vectors, cfg=IndexConfig(kind="hnsw", ef_search=256))
    found = hnsw.search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall > 0.9
    assert build_index(vectors, cfg=IndexConfig(kind="auto", auto_exact_limit=100, nlist=8))[1] == "IVF8,Flat"
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(vectors, cfg=IndexConfig(kind="lsh"))
    with pytest.raises(ValueError, match="must divide"):
        build_index(vectors, cfg=IndexConfig(kind="ivfpq", pq_m=7))


def test_paired_recall_matches_the_evaluation_metric():
    images = _unit(300, 16, 0)
    texts = images + 0.6 * _unit(300, 16, 1)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    index = SearchIndex.from_embeddings(images)
    expected = recall_at_k(texts, images, (1, 5, 10))
    assert paired_recall(index, texts, (1, 5, 10), batch=64) == {key: expected[key] for key in ("R@1", "R@5", "R@10")}


def test_hits_carry_the_metadata():
    vectors = _unit(4, 8, 0)
    rows = [{"id": f"img{i}", "caption": f"caption {i}", "labels": {"modality": "ct"}} for i in range(4)]
    hits = SearchIndex.from_embeddings(vectors, rows).search(vectors[2:3], k=10)[0]
    assert len(hits) == 4 and hits[0].id == "img2" and hits[0].rank == 1 and hits[0].caption == "caption 2"
    assert hits[0].labels == {"modality": "ct"} and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="8-d"):
        SearchIndex.from_embeddings(vectors, rows).search(_unit(1, 4, 0))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    shard_set = synthetic_shards(root / "shards", {"dev": 24})
    model = clip_med.load(save_checkpoint(root / "run"))
    extract(model, shard_set.urls("dev"), root / "out", ExtractConfig(workers=0, progress=False))
    return model, root / "out"


def test_search_by_text_and_image_from_python_and_the_command(embedded):
    model, out = embedded
    index = clip_med.open_index(out)
    vectors = np.load(out / "image_embeddings.npy")
    query = model.embed_texts(["an MRI of the spine"])
    hits = model.search(index, text="an MRI of the spine", k=5)
    assert [hit.position for hit in hits] == list(_brute_force(query, vectors, 5)[0])
    image_hits = model.search(index, image=gradient(), k=3)
    assert len(image_hits) == 3 and image_hits[0].score >= image_hits[1].score
    output = run_search(SearchConfig(index=str(out), text="an MRI of the spine", k=5, device="cpu"))
    assert [hit.id for hit in output.hits] == [hit.id for hit in hits]
    table = format_search(output)
    assert "top 5 of 24" in table and hits[0].id in table
    assert json.loads(format_search(output, "json"))["results"][0]["id"] == hits[0].id
    with pytest.raises(ValueError, match="exactly one"):
        model.search(index, text="x", image=gradient())


def test_rebuild_and_recall_from_the_command(embedded):
    model, out = embedded
    texts = np.load(out / "text_embeddings.npy")
    images = np.load(out / "image_embeddings.npy")
    expected = recall_at_k(texts, images, (1, 5, 10))
    output = run_search(SearchConfig(index=str(out), build="ivf", build_options=IndexConfig(nlist=2), nprobe=2,
                                     recall=True))
    assert json.loads((out / "index.json").read_text())["factory"] == "IVF2,Flat"
    assert output.recall == {key: expected[key] for key in ("R@1", "R@5", "R@10")} and not output.hits
    assert "text->image recall over 24 pairs" in format_search(output)
    run_search(SearchConfig(index=str(out), build="flat"))
    with pytest.raises(ValueError, match="give a query"):
        run_search(SearchConfig(index=str(out)))


def test_an_index_refuses_another_models_queries(embedded, tmp_path):
    _, out = embedded
    other = clip_med.load(save_checkpoint(tmp_path / "other", seed=4))
    with pytest.raises(IndexFolderError, match="another model"):
        other.search(clip_med.open_index(out), text="CT")
    with pytest.raises(IndexFolderError, match="not an embedding folder"):
        clip_med.open_index(tmp_path)
