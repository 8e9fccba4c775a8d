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


def test_fast_evaluation_batches_cover_every_text_once_within_the_token_budget(minilm):
    """The batches a batch-invariant model is evaluated in: every sample once, each batch cut to its longest text and
    at most _EVAL_TOKENS tokens (a single text may be longer), token for token what tokenizing the batch gives; the
    fixed batches of 32 (for models whose answers move with their batch-mates) are unchanged."""
    import numpy as np

    from slimship.workload.text import _EVAL_TOKENS

    texts = minilm.eval_texts(limit=200)
    for batches, most in (
        (list(minilm.fast_eval_batches(limit=200)), None),
        (list(minilm.eval_batches(200)), 32),
    ):
        seen = np.concatenate([idx for idx, _ in batches])
        assert sorted(seen.tolist()) == list(range(400))
        for idx, batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            assert mask[:, -1].any()  # no column of padding only
            if most is None:
                assert len(idx) == 1 or ids.size <= _EVAL_TOKENS
            else:
                assert len(idx) <= most
            direct = minilm._tokenize([texts[i] for i in idx])
            assert all(np.array_equal(direct[k], batch[k]) for k in direct)
    assert len(list(minilm.eval_batches(200))) == 13  # 400 texts in batches of 32
    assert len(list(minilm.fast_eval_batches(200))) > 50  # bodies 4 at a time


def test_only_graphs_without_per_tensor_dynamic_scales_count_as_batch_invariant(minilm_chain, minilm_int8):
    from slimship.measure.evaluate import answers_batch_invariant

    original, _, optimized = minilm_chain
    assert answers_batch_invariant(original) and answers_batch_invariant(optimized)
    assert not answers_batch_invariant(minilm_int8)  # DynamicQuantizeLinear: one scale over the whole batch
