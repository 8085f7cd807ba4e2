"""Accuracy of a sparse model against its dense original, streamed over batches: relative output
error, perplexity / top-1 agreement / KL for causal LMs, mean-pooled (attention-masked) embedding
cosine for encoders."""

from __future__ import annotations

import numpy as np

from ..calibration.lm_loss import ids_of, log_softmax, next_token_nll, real_tokens


class Metrics:
    """Streaming accuracy metrics of a sparse model's outputs against the dense model's, over batches.
    ``kind``: "causal-lm" (perplexity, agreement, KL), "encoder" (embedding cosine) or "generic"."""

    def __init__(self, outputs: list[str], kind: str):
        self.outputs, self.kind = list(outputs), kind
        self.sq_diff: dict[str, float] = {o: 0.0 for o in outputs}
        self.sq_ref: dict[str, float] = {o: 0.0 for o in outputs}
        self.max_abs: dict[str, float] = {o: 0.0 for o in outputs}
        self.nll_d = self.nll_s = 0.0
        self.n_nll = 0
        self.agree = 0
        self.n_pos = 0
        self.kl: list[np.ndarray] = []
        self.cos: list[float] = []
        self.tokens = 0
        self.batches = 0

    def add(self, feeds: dict, dense: dict[str, np.ndarray], sparse: dict[str, np.ndarray], n_tok: int) -> None:
        self.tokens += n_tok
        self.batches += 1
        for o in self.outputs:
            a, b = dense[o], sparse[o]
            if a.dtype.kind != "f" or a.size == 0:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            self.sq_diff[o] += float(np.square(a64 - b64).sum())
            self.sq_ref[o] += float(np.square(a64).sum())
            self.max_abs[o] = max(self.max_abs[o], float(np.abs(a64 - b64).max()))
        ids = ids_of(feeds)
        mask = next((v for k, v in feeds.items() if "attention_mask" in k), None)
        if self.kind == "causal-lm" and ids is not None and "logits" in dense:
            self._lm(ids, mask, dense["logits"], sparse["logits"])
        elif self.kind == "encoder":
            self._encoder(mask, dense, sparse)

    def _lm(self, ids, mask, ld, ls) -> None:
        valid = real_tokens(ids, mask)
        lpd, lps = log_softmax(ld), log_softmax(ls)
        pd_, ps_ = next_token_nll(lpd, ids, valid), next_token_nll(lps, ids, valid)
        self.nll_d += float(pd_.astype(np.float64).sum())
        self.nll_s += float(ps_.astype(np.float64).sum())
        self.n_nll += int(pd_.size)
        # next-token distributions at every real position
        self.agree += int((ld.argmax(-1) == ls.argmax(-1))[valid].sum())
        self.n_pos += int(valid.sum())
        kl = (np.exp(lpd) * (lpd - lps)).sum(-1)
        self.kl.append(np.maximum(kl[valid], 0.0).astype(np.float64))

    def _encoder(self, mask, dense, sparse) -> None:
        name = next((o for o in ("sentence_embedding", "pooler_output", "last_hidden_state", "token_embeddings")
                     if o in dense), None)
        if name is None:
            name = next((o for o in self.outputs if dense[o].dtype.kind == "f" and dense[o].ndim in (2, 3)), None)
        if name is None:
            return
        ea, eb = dense[name].astype(np.float64), sparse[name].astype(np.float64)
        if ea.ndim == 3:
            if mask is not None and mask.shape == ea.shape[:2]:
                w = mask.astype(np.float64)[..., None]
                ea = (ea * w).sum(1) / np.maximum(w.sum(1), 1.0)
                eb = (eb * w).sum(1) / np.maximum(w.sum(1), 1.0)
            else:
                ea, eb = ea.mean(1), eb.mean(1)
        num = (ea * eb).sum(-1)
        den = np.linalg.norm(ea, axis=-1) * np.linalg.norm(eb, axis=-1)
        self.cos.extend((num / np.maximum(den, 1e-300)).tolist())
        self.embedding_output = name

    def result(self) -> dict:
        out: dict = {"tokens": self.tokens, "batches": self.batches}
        out["outputs"] = {
            o: {"rel_error": (float(np.sqrt(self.sq_diff[o] / self.sq_ref[o])) if self.sq_ref[o] > 0 else 0.0),
                "max_abs_error": self.max_abs[o]}
            for o in self.outputs if self.sq_ref[o] > 0 or self.sq_diff[o] > 0
        }
        if self.n_nll:
            pd, ps = float(np.exp(self.nll_d / self.n_nll)), float(np.exp(self.nll_s / self.n_nll))
            out["perplexity"] = {
                "dense": pd, "sparse": ps, "change": ps - pd, "change_pct": 100.0 * (ps / pd - 1.0),
                "nll_dense": self.nll_d / self.n_nll, "nll_sparse": self.nll_s / self.n_nll,
                "tokens": self.n_nll,
            }
        if self.n_pos:
            kl = np.concatenate(self.kl) if self.kl else np.zeros(1)
            out["top1_agreement"] = self.agree / self.n_pos
            out["kl"] = {"mean": float(kl.mean()), "p50": float(np.percentile(kl, 50)),
                         "p99": float(np.percentile(kl, 99)), "max": float(kl.max()), "positions": int(kl.size)}
        if self.cos:
            c = np.asarray(self.cos)
            out["embedding"] = {"output": getattr(self, "embedding_output", None), "pooling": "mean",
                                "cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "rows": int(c.size)}
        return out
