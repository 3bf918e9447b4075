"""The HRA math as pure tensor functions: no modules, no state, easy to check against dense references.

Every adapter here is one orthogonal matrix in compact form, ``H = I - V S V^T`` with V (d, k) and S (k, k).
A d x d matrix is never built: applying H to activations costs O(N d k), merging it into a weight O(d_out d k).

- plain HRA: ``H = H_1 ... H_r`` with ``H_i = I - 2 u_i u_i^T / |u_i|^2``. With V the column-normalized U this is
  the WY form, S = T upper triangular with ``T^{-1} = striu(V^T V) + I/2`` (k = r).
- strictly orthogonal HRA (``apply_GS``): the paper's ``I - 2 Q Q^T`` with Q an orthonormal basis of span(U) is a
  reflection of an r-dim subspace and never the identity, so we compose it with the frozen reflection of the
  initial vectors, which is its own inverse: ``H = (I - 2 Q Q^T)(I - 2 Q0 Q0^T)``. It is exactly I at the start,
  exactly orthogonal always, and in compact form with V = [Q, Q0], S = [[2I, -4 Q^T Q0], [0, 2I]] (k = 2r).

Conventions: linear layers compute ``y = x W^T`` with row-vector activations x (..., d_in); HRA replaces W by W H.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12


def normalize_columns(u: Tensor) -> Tensor:
    return u / u.norm(dim=0, keepdim=True).clamp_min(EPS)


def wy_factor(v: Tensor) -> Tensor:
    """T such that H_1 ... H_r = I - V T V^T for unit columns V (a triangular r x r solve, well posed: diagonal 1/2)."""
    r = v.shape[1]
    eye = torch.eye(r, dtype=v.dtype, device=v.device)
    t_inv = torch.triu(v.T @ v, diagonal=1) + 0.5 * eye
    return torch.linalg.solve_triangular(t_inv, eye, upper=True)


def orthonormal_basis(u: Tensor) -> Tensor:
    """Q with orthonormal columns spanning span(U): Gram-Schmidt done stably, by QR."""
    return torch.linalg.qr(u, mode="reduced")[0]


def hra_factors(u: Tensor, u0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(V, S) with H = I - V S V^T, computed in float32 (or float64) whatever the model's dtype.

    ``u0`` given selects the strictly orthogonal variant (frozen initial vectors), see the module docstring.
    """
    if u.dtype not in (torch.float32, torch.float64):
        u = u.float()
    if u0 is None:
        v = normalize_columns(u)
        return v, wy_factor(v)
    q, q0 = orthonormal_basis(u), orthonormal_basis(u0.to(u.dtype))
    r = q.shape[1]
    eye = torch.eye(r, dtype=u.dtype, device=u.device)
    s = torch.cat([torch.cat([2 * eye, -4 * (q.T @ q0)], dim=1), torch.cat([torch.zeros_like(eye), 2 * eye], dim=1)])
    return torch.cat([q, q0], dim=1), s


def dense(v: Tensor, s: Tensor) -> Tensor:
    """The full d x d matrix. For tests, references and tiny layers only: the fast paths never call it."""
    return torch.eye(v.shape[0], dtype=v.dtype, device=v.device) - v @ s @ v.T


def apply_transpose(x: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """x H^T = x - ((x V) S^T) V^T: the activation-side form, what a layer with weight W H feeds its frozen W."""
    z = (x @ v) @ s.T
    return torch.addmm(x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1]), v.T, alpha=-1).view_as(x)


def lora_factors(weight2d: Tensor, v: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(down, up) with W H = W + up @ down: the exact rank-k LoRA form (down = V^T, up = -(W V S))."""
    return v.T, -(weight2d @ (v @ s))


def merge(weight2d: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """W H = W - (W V S) V^T in O(d_out d_in k)."""
    return torch.addmm(weight2d, weight2d @ (v @ s), v.T, alpha=-1)


def unmerge(weight2d: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """W = (W H) H^T, exact because H is orthogonal."""
    return torch.addmm(weight2d, weight2d @ (v @ s.T), v.T, alpha=-1)


def orthogonality_penalty(u: Tensor) -> Tensor:
    """The paper's regularizer ||I - V^T V||_F^2 for column-normalized U."""
    v = normalize_columns(u.float() if u.dtype not in (torch.float32, torch.float64) else u)
    eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
    return (eye - v.T @ v).pow(2).sum()


def paired_init(d: int, r: int, generator: torch.Generator | None = None) -> Tensor:
    """U = [u1, u1, u2, u2, ...]: each pair of equal reflections cancels, so H = I exactly at the start."""
    if r % 2:
        raise ValueError(f"paired initialization needs an even r, got r={r}")
    return random_init(d, r // 2, generator).repeat_interleave(2, dim=1)


def random_init(d: int, r: int, generator: torch.Generator | None = None) -> Tensor:
    """Kaiming-uniform columns (peft's scale for a (d, r) parameter); a random, non-identity reflection chain."""
    bound = 1.0 / d**0.5
    return (torch.rand(d, r, generator=generator) * 2 - 1) * bound


def fractional_factors(v: Tensor, s: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """(V', S') with I - V' S' V'^T = H^strength, the orthogonal interpolation between I (0) and H (1).

    H is the identity outside span(V) and maps it to itself, so H^a = I - Q (I - K^a) Q^T with Q an orthonormal
    basis of span(V) and K = Q^T H Q, a k x k rotation: only k x k work. A rotation splits into planes turned by
    angles theta: the symmetric part (K + K^T)/2 has eigenvalues cos(theta) on them, and on each plane the skew part
    is sin(theta) J, so K^a = cos(a theta) + sin(a theta) J there. Half turns (theta = pi, skew part 0) get a
    direction of our choosing, pair by pair. det H = -1 (plain HRA with odd r) leaves one unpaired -1: then no real
    orthogonal H^a exists, and we say so.
    """
    if strength == 1.0:
        return v, s
    q = torch.linalg.qr(v.double(), mode="reduced")[0]
    c = q.T @ v.double()
    k = torch.eye(q.shape[1], dtype=q.dtype, device=q.device) - c @ s.double() @ c.T
    cos_t, e = torch.linalg.eigh((k + k.T) / 2)
    theta = torch.arccos(cos_t.clamp(-1, 1))
    sin_t = torch.sin(theta)
    half = (cos_t < 0) & (sin_t < 1e-7)
    if int(half.sum()) % 2:
        raise ValueError(
            "this adapter is a reflection (det H = -1: plain HRA with odd r), so no real orthogonal fractional "
            "power exists; use strength 0 or 1, or train with an even r or apply_GS=True"
        )
    ratio = torch.sin(strength * theta) / sin_t.clamp_min(1e-12)  # sin(a theta) / sin(theta), -> a as theta -> 0
    scale = torch.where(sin_t > 1e-12, ratio, torch.full_like(theta, strength))
    skew = e.T @ ((k - k.T) / 2) @ e
    k_power = torch.diag(torch.cos(strength * theta)) + (scale[:, None] + scale[None, :]) / 2 * skew
    idx = torch.nonzero(half).flatten().tolist()
    ca, sa = torch.cos(torch.tensor(torch.pi * strength)), torch.sin(torch.tensor(torch.pi * strength))
    for i, j in zip(idx[0::2], idx[1::2]):
        k_power[i, :] = k_power[:, i] = k_power[j, :] = k_power[:, j] = 0
        k_power[i, i] = k_power[j, j] = ca
        k_power[j, i], k_power[i, j] = sa, -sa
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    return q.to(v.dtype), (eye - e @ k_power @ e.T).to(v.dtype)
