from __future__ import annotations

import numpy as np
import torch

from slimship.runtime.torch_backend import TorchRuntime


def test_minilm_embeddings_equal_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm.model_dir), device="cpu")
    st.max_seq_length = 128  # the workload's sequence length (the package's default is 256)
    texts = minilm.eval_texts(limit=24)
    expected = st.encode(texts, batch_size=16, convert_to_numpy=True)
    model = minilm.build_model()
    rt = TorchRuntime(model, minilm.inputs, ["sentence_embedding"], threads=torch.get_num_threads())
    got = rt.predict(minilm._tokenize(texts))["sentence_embedding"]
    assert got.shape == (48, 384)
    cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cos.min() > 0.99999
    assert np.abs(got - expected).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_minilm_drops_the_unused_pooler(minilm):
    model = minilm.build_model()
    assert model.backbone.pooler is None
    assert not any(k.startswith("backbone.pooler") for k in model.state_dict())


def test_bbc_data_is_real_and_split_into_headline_and_body(minilm):
    heads, bodies, labels, perm = minilm._data
    assert len(heads) == len(bodies) == len(labels) == 2225
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4]
    assert heads[0] == "US duo in first spam conviction"
    assert all(h and b and h not in b[: len(h)] for h, b in zip(heads[:50], bodies[:50], strict=True))
    texts = minilm.eval_texts(limit=10)
    assert texts[:10] == [heads[i] for i in perm[:10]] and texts[10:] == [bodies[i] for i in perm[:10]]


def test_calibration_text_is_disjoint_from_evaluation(minilm):
    calib = minilm._tail_paragraphs
    assert len(calib) > 1000
    batch = next(minilm.calibration_batches(num_samples=8, batch_size=8))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].dtype == np.int64
    # calibration paragraphs come from beyond the first 128 tokens evaluation sees
    first = minilm.tokenizer(minilm.eval_texts()[2225 + 0], truncation=True, max_length=128)["input_ids"]
    assert minilm.tokenizer.decode(first[1:-1])[:40] not in " ".join(calib[:200]).lower()


def test_quality_metrics_behave(minilm):
    n = 60
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2 * n, 384)).astype(np.float32)
    emb[n:] = emb[:n]  # every body equals its headline: perfect retrieval
    q = minilm.quality({"sentence_embedding": emb}, limit=n)
    assert q["retrieval_top1"] == 100.0 and q["retrieval_mrr"] == 1.0
    emb[n:] = np.roll(emb[:n], 1, axis=0)  # every headline points at the wrong article
    q = minilm.quality({"sentence_embedding": emb}, limit=n)
    assert q["retrieval_top1"] == 0.0 and q["retrieval_mrr"] < 1.0


def test_a_hugging_face_directory_is_a_workload(minilm):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"hf:{minilm.model_dir}")
    assert w.name == f"hf:{minilm.model_dir}" and w.ref == {"name": w.name, "hf_dir": str(minilm.model_dir)}
    assert w.model_info.family == "bert" and w.model_info.num_heads == 12 and w.model_info.hidden_size == 384
    assert w.fingerprint() == minilm.fingerprint()  # same weights, same data, same pooling
    assert resolve_workload(w.ref).name == w.name  # a candidate's recorded ref rebuilds it
