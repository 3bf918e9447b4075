"""HRAConfig: everything that defines an adapter, and nothing about where it is stored."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
GS_FORMS = ("identity_start", "paper")  # the strictly orthogonal (apply_GS) operators, see HRAConfig.gs_form


@dataclass
class HRAConfig:
    """Settings of one HRA adapter (peft's names where peft has them).

    r: reflections per layer; even r starts exactly at the base model (paired init).
    apply_GS: strictly orthogonal: Q is the Gram-Schmidt orthonormal basis of the r vectors, in the form
        ``gs_form`` names.
    gs_form: which strictly orthogonal operator (only with apply_GS; files without the field mean "identity_start"):
        "identity_start" (default): (I - 2QQ^T)(I - 2Q0Q0^T) with Q0 the frozen initial planes. It starts exactly at
        the base model for any r, and its weight update has rank up to 2r. It is not the paper's form.
        "paper": I - 2QQ^T, exactly the paper's lambda = infinity (Table 4), the official code's and peft's
        apply_GS: a weight update of rank r, and never the base model (a reflection of an r-dim subspace), so it
        needs init="random" to say that the start is not the base model.
    lambda_orth: weight of the orthogonality regularizer sum ||I - U^T U||_F^2 (ignored with apply_GS).
    target_modules: module-name suffixes ("to_q", "attn1.to_out.0") or, as a string, one regex matched in full
        against module paths, like peft.
    exclude_modules: suffixes or a regex, removed from the targets.
    init: "identity" (paired, needs even r unless apply_GS) or "random" (peft's odd-r fallback: an explicit
        non-identity start).
    """

    r: int = 8
    apply_GS: bool = False
    gs_form: str = "identity_start"
    lambda_orth: float = 0.0
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    exclude_modules: tuple[str, ...] | str = ()
    init: str = "identity"

    def __post_init__(self) -> None:
        # types checked too: configs also come from adapter files, where "apply_GS": "no" would read as True
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if not isinstance(value, str):
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"HRAConfig.{name} must be a string or a list of strings, got {value!r}")
                setattr(self, name, tuple(value))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"HRAConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.apply_GS, bool):
            raise ValueError(f"HRAConfig.apply_GS must be true or false, got {self.apply_GS!r}")
        if isinstance(self.lambda_orth, bool) or not isinstance(self.lambda_orth, (int, float)):
            raise ValueError(f"HRAConfig.lambda_orth must be a number, got {self.lambda_orth!r}")
        if self.init not in ("identity", "random"):
            raise ValueError(f"HRAConfig.init must be 'identity' or 'random', got {self.init!r}")
        if self.gs_form not in GS_FORMS:
            raise ValueError(f"HRAConfig.gs_form must be one of {GS_FORMS}, got {self.gs_form!r}")
        if self.gs_form == "paper" and not self.apply_GS:
            raise ValueError(
                "HRAConfig.gs_form='paper' names a strictly orthogonal form, but apply_GS is false: set apply_GS=True "
                "for the paper's I - 2QQ^T, or leave gs_form at its default for plain HRA"
            )
        if self.gs_form == "paper" and self.init == "identity":
            raise ValueError(
                "the paper's strictly orthogonal form I - 2QQ^T is a reflection, never the identity, so it cannot "
                "start at the base model: pass init='random' to accept that start, or use gs_form='identity_start' "
                "(identity at the start, an update of rank up to 2r)"
            )
        if self.init == "identity" and self.r % 2 and not self.apply_GS:
            raise ValueError(
                f"HRA with r={self.r} cannot start at the base model: a product of an odd number of reflections "
                f"has determinant -1, so it is never the identity. Use an even r (e.g. r={self.r + 1}), "
                "apply_GS=True (identity start for any r), or init='random' to accept a non-identity start."
            )
        if not 0 <= self.lambda_orth < float("inf"):
            raise ValueError(f"HRAConfig.lambda_orth must be a finite number >= 0, got {self.lambda_orth}")

    @property
    def has_initial_planes(self) -> bool:
        """Whether the adapter keeps frozen initial vectors (hra_u0): only the identity_start strictly orthogonal
        form, which undoes their reflection to start at the identity."""
        return self.apply_GS and self.gs_form == "identity_start"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HRAConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"an HRAConfig is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown HRAConfig fields {sorted(unknown)}: the file was written by a newer version")
        return cls(**data)
