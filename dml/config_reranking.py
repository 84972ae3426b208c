"""Config of retrieval post-processing in `dml evaluate` (``evaluate.reranking``).

``methods`` is a chain applied in order and reported alone and together:
``dba`` (database-side augmentation), ``alpha_qe`` (alpha query expansion) and
``k_reciprocal`` (k-reciprocal re-ranking, which ranks rather than changes vectors, so it
comes last). See :mod:`dml.eval.query_expansion` and :mod:`dml.eval.k_reciprocal`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RerankingMethod = Literal["dba", "alpha_qe", "k_reciprocal"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExpansionConfig(_Strict):
    """alpha-QE / DBA: ``k`` neighbours, weighted by max(cosine, 0) ** ``alpha`` (Radenović et al.
    use alpha 3; alpha 0 is plain average expansion)."""

    k: int = Field(5, ge=1)
    alpha: float = Field(3.0, ge=0.0)


class KReciprocalConfig(_Strict):
    """k-reciprocal re-ranking; defaults are the paper's (Zhong et al., CVPR 2017)."""

    k1: int = Field(20, ge=1)
    k2: int = Field(6, ge=1)
    lambda_value: float = Field(0.3, ge=0.0, le=1.0)


class RerankingConfig(_Strict):
    """``evaluate.reranking``: empty ``methods`` (default) means no post-processing."""

    methods: tuple[RerankingMethod, ...] = ()
    alpha_qe: ExpansionConfig = ExpansionConfig()
    dba: ExpansionConfig = ExpansionConfig()
    k_reciprocal: KReciprocalConfig = KReciprocalConfig()

    @model_validator(mode="after")
    def _valid_chain(self) -> RerankingConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"evaluate.reranking.methods lists a method twice: {list(self.methods)}")
        if "k_reciprocal" in self.methods and self.methods[-1] != "k_reciprocal":
            raise ValueError(
                "evaluate.reranking.methods: k_reciprocal ranks instead of changing embeddings, so it must come last"
            )
        if {"alpha_qe", "k_reciprocal"} <= set(self.methods):
            raise ValueError(
                "evaluate.reranking.methods: k_reciprocal already expands each query over its "
                "k2 neighbours; list alpha_qe or k_reciprocal, not both"
            )
        return self
