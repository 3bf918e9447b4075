"""The HRA math as pure tensor functions: no modules, no state, easy to check against dense references.

Every adapter here is one orthogonal matrix in compact form, ``H = I - V S V^T`` with V (d, k) and S (k, k).
A d x d matrix is never built: applying H to activations costs O(N d k), merging it into a weight O(d_out d k).

- plain HRA: ``H = H_1 ... H_r`` with ``H_i = I - 2 u_i u_i^T / |u_i|^2``. With V the column-normalized U this is
  the WY form, S = T upper triangular with ``T^{-1} = striu(V^T V) + I/2`` (k = r).
- strictly orthogonal HRA (``apply_GS``), Q an orthonormal basis of span(U) (Gram-Schmidt, done by QR), two forms:
  - "paper": the paper's (and peft's) ``H = I - 2 Q Q^T``, V = Q, S = 2I (k = r). A reflection of an r-dim
    subspace, so never the identity.
  - "identity_start" (our default): that reflection composed with the frozen reflection of the initial vectors,
    which is its own inverse: ``H = (I - 2 Q Q^T)(I - 2 Q0 Q0^T)``. It is exactly I at the start, exactly
    orthogonal always, and in compact form with V = [Q, Q0], S = [[2I, -4 Q^T Q0], [0, 2I]] (k = 2r).

Conventions: linear layers compute ``y = x W^T`` with row-vector activations x (..., d_in); HRA replaces W by W H.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

EPS = 1e-12


def normalize_columns(u: Tensor) -> Tensor:
    return u / u.norm(dim=-2, keepdim=True).clamp_min(EPS)


def wy_factor(v: Tensor) -> Tensor:
    """T such that H_1 ... H_r = I - V T V^T for unit columns V (a triangular r x r solve, well posed: diagonal 1/2).

    Leading dimensions are batch dimensions: (..., d, r) -> (..., r, r)."""
    r = v.shape[-1]
    eye = torch.eye(r, dtype=v.dtype, device=v.device)
    t_inv = torch.triu(v.mT @ v, diagonal=1) + 0.5 * eye
    return torch.linalg.solve_triangular(t_inv, eye.expand_as(t_inv), upper=True)


class _PlainFactors(torch.autograd.Function):
    """(V, T) of plain HRA from U in one autograd node with a closed-form backward; U may be a (L, d, r) batch.

    The same math as ``normalize_columns`` + ``wy_factor`` under autograd, but about 15 tiny kernels fewer per
    layer and step: with 64-256 tokens a layer's whole step is a few ms, so these fixed costs show (measured).
    Backward: T = M^-1 with M = striu(V^T V) + I/2 gives dM = -T^T dT T^T, only its strict upper part reaches
    V^T V, so dV += V (G + G^T) with G = striu(dM); then through V = U / |U|: dU = (dV - V diag(V^T dV)) / |U|.
    """

    @staticmethod
    def forward(ctx, u: Tensor) -> tuple[Tensor, Tensor]:
        norm = u.norm(dim=-2, keepdim=True)
        v = u / norm.clamp_min(EPS)
        t = wy_factor(v)
        ctx.save_for_backward(v, t, norm)
        return v, t

    @staticmethod
    @once_differentiable  # the saved tensors were computed without a graph
    def backward(ctx, dv: Tensor, dt: Tensor) -> Tensor:
        v, t, norm = ctx.saved_tensors
        g = torch.triu(t.mT @ dt @ t.mT, diagonal=1)
        dv = dv - v @ (g + g.mT)
        radial = (v * dv).sum(dim=-2, keepdim=True) * (norm > EPS)  # clamped norms are constants, as in autograd
        return (dv - v * radial) / norm.clamp_min(EPS)


def orthonormal_basis(u: Tensor) -> Tensor:
    """Q with orthonormal columns spanning span(U): Gram-Schmidt done stably, by QR."""
    return torch.linalg.qr(u, mode="reduced")[0]


def hra_factors(u: Tensor, u0: Tensor | None = None, *, gram_schmidt: bool = False) -> tuple[Tensor, Tensor]:
    """(V, S) with H = I - V S V^T, computed in float32 (or float64) whatever the model's dtype.

    Plain HRA by default; ``gram_schmidt`` alone selects the paper's strictly orthogonal I - 2QQ^T, and ``u0`` (the
    frozen initial vectors, implying ``gram_schmidt``) the identity_start form, see the module docstring.
    Leading dimensions are a batch: (..., d, r) -> (..., d, k), (..., k, k).
    """
    if u.dtype not in (torch.float32, torch.float64):
        u = u.float()
    if u0 is None and not gram_schmidt:
        return _PlainFactors.apply(u)
    q = orthonormal_basis(u)
    r = q.shape[-1]
    eye = torch.eye(r, dtype=u.dtype, device=u.device).expand(*q.shape[:-2], r, r)
    if u0 is None:
        return q, 2 * eye
    q0 = orthonormal_basis(u0.to(u.dtype))
    top = torch.cat([2 * eye, -4 * (q.mT @ q0)], dim=-1)
    bottom = torch.cat([torch.zeros_like(eye), 2 * eye], dim=-1)
    return torch.cat([q, q0], dim=-1), torch.cat([top, bottom], dim=-2)


def hra_factors_batch(
    us: list[Tensor], u0s: list[Tensor] | None = None, *, gram_schmidt: bool = False
) -> list[tuple[Tensor, Tensor]]:
    """hra_factors for many adapters of one shape and kind, in one batched computation instead of one per layer.

    A UNet step pays the per-layer factor cost hundreds of times (560 layers on SDXL: 4% of a CPU step, measured);
    batched it is paid once. Each V comes as the transpose of a contiguous (k, d) slice, the layout the
    activation-side products want (see _ApplyTranspose), so they need no copy. Slices come from ``unbind``: an
    indexed slice's backward would fill a zero tensor of the whole batch, for each slice (quadratic).
    """
    v, s = hra_factors(torch.stack(us), None if u0s is None else torch.stack(u0s), gram_schmidt=gram_schmidt)
    return [(vt.T, si) for vt, si in zip(v.mT.contiguous().unbind(), s.unbind())]


def dense(v: Tensor, s: Tensor) -> Tensor:
    """The full d x d matrix. For tests, references and tiny layers only: the fast paths never call it."""
    return torch.eye(v.shape[0], dtype=v.dtype, device=v.device) - v @ s @ v.T


def apply_transpose(x: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """x H^T = x - ((x V) S^T) V^T: the activation-side form, what a layer with weight W H feeds its frozen W."""
    if autocast_enabled(x.device.type):  # let autocast pick each product's dtype, autograd follows
        z = (x @ v) @ s.T
        return torch.addmm(x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1]), v.T, alpha=-1).view(x.shape)
    return _ApplyTranspose.apply(x, v, s)


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class _ApplyTranspose(torch.autograd.Function):
    """apply_transpose with a hand-written backward, because on CPU the thin (N, k) products dominate the cost:

    - V is used as a contiguous (k, d) matrix and dV is formed as (k, d) = z^T g + b^T x: x @ V with V (d, k)
      row-major and x^T @ p are 2-5x slower in MKL than the same products in this layout (measured, k = 8);
    - the input gradient g - (g V S) V^T is one addmm, not a matmul plus a separate full-size add;
    - one autograd node instead of four, and only x and p = x V (N, k) are saved.
    """

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, s: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        vt = v.T.contiguous()
        p = x2 @ vt.T
        out = torch.addmm(x2, p @ s.T, vt, alpha=-1)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, vt, s, p)
        return out.view(x.shape)

    @staticmethod
    @once_differentiable  # the saved tensors were computed without a graph
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, vt, s, p = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        a = g @ vt.T  # -dL/dz, z = p S^T
        b = a @ s  # -dL/dp
        dx = dv = ds = None
        if ctx.needs_input_grad[0]:
            dx = torch.addmm(g, b, vt, alpha=-1).view(grad.shape)
        if ctx.needs_input_grad[1]:  # dV^T = -(z^T g + b^T x)
            dv = -((p @ s.T).T @ g + b.T @ x2).T
        if ctx.needs_input_grad[2]:
            ds = -(a.T @ p)
        return dx, dv, ds


def apply_transpose_linear(x: Tensor, v: Tensor, s: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x H^T, weight, bias) for a frozen weight: what HRALayer computes on a plain nn.Linear.

    Fused so that the backward owns the gradient g W it computes and subtracts the HRA term in place (one full-size
    (N, d_in) buffer fewer per call, 1-6% of the layer's step on CPU, measured). A trainable weight or bias, or
    autocast, takes the composed path.
    """
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trainable or autocast_enabled(x.device.type):
        return torch.nn.functional.linear(apply_transpose(x, v, s), weight, bias)
    return _ApplyTransposeLinear.apply(x, v, s, weight, bias)


class _ApplyTransposeLinear(torch.autograd.Function):
    """apply_transpose followed by a frozen linear layer, one node; the same algebra as _ApplyTranspose.

    Without an input gradient the backward needs only g W V and z^T g W, both thin: the (N, d_in) product g W that
    the composed form pays for the frozen layer's backward is skipped, as LoRA skips it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, s: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        vt = v.T.contiguous()
        p = x2 @ vt.T
        out = torch.nn.functional.linear(torch.addmm(x2, p @ s.T, vt, alpha=-1), weight, bias)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, vt, s, p, weight)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # the saved tensors were computed without a graph
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, vt, s, p, weight = ctx.saved_tensors
        gy = grad.reshape(-1, grad.shape[-1])
        dx = dv = ds = None
        if ctx.needs_input_grad[0]:
            g = gy @ weight  # gradient at x H^T, needed for dx anyway; a fresh buffer of our own
            a = g @ vt.T
            b = a @ s
            zt_g = (p @ s.T).T @ g
        else:  # no input gradient (text states, the first adapted layer): never form the (N, d_in) g W
            a = gy @ (weight @ vt.T)
            b = a @ s
            zt_g = ((p @ s.T).T @ gy) @ weight
        if ctx.needs_input_grad[1]:
            dv = -(zt_g + b.T @ x2).T
        if ctx.needs_input_grad[2]:
            ds = -(a.T @ p)
        if ctx.needs_input_grad[0]:
            dx = g.addmm_(b, vt, alpha=-1).view(*grad.shape[:-1], g.shape[-1])
        return dx, dv, ds, None, None


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
    """Uniform in +-1/sqrt(r): what peft's and the released code's kaiming_uniform_(a=sqrt(5)) gives a (d, r)
    tensor (torch takes its fan-in from the second dimension). Only directions matter to H, but the length sets how
    far a learning rate turns them, so matching it keeps the released code's learning rates meaningful."""
    bound = 1.0 / r**0.5
    return (torch.rand(d, r, generator=generator) * 2 - 1) * bound


def fractional_factors(v: Tensor, s: Tensor, strength: float | Tensor) -> tuple[Tensor, Tensor]:
    """(V', S') with I - V' S' V'^T = H^strength, the orthogonal interpolation between I (0) and H (1).

    H is the identity outside span(V) and maps it to itself, so H^a = I - Q (I - K^a) Q^T with Q an orthonormal
    basis of span(V) and K = Q^T H Q, a k x k rotation: only k x k work. A rotation splits into planes turned by
    angles theta: the symmetric part (K + K^T)/2 has eigenvalues cos(theta) on them, and on each plane the skew part
    is sin(theta) J, so K^a = cos(a theta) + sin(a theta) J there. Half turns (theta = pi, skew part 0) get a
    direction of our choosing, pair by pair (the paper's GS form I - 2QQ^T is all half turns: its H^a is one of many).
    det H = -1 (odd r, plain or the paper's GS form) leaves one unpaired -1: then no real orthogonal H^a exists, and
    we say so. Leading dimensions of V and S are a batch, ``strength`` a number or one per item.
    """
    if not isinstance(strength, Tensor) and strength == 1.0:
        return v, s
    k = v.shape[-1]
    a = torch.as_tensor(strength, dtype=torch.float64, device=v.device).expand(v.shape[:-2])[..., None]
    q = torch.linalg.qr(v.double(), mode="reduced")[0]
    c = q.mT @ v.double()
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    rot = eye - c @ s.double() @ c.mT
    cos_t, e = torch.linalg.eigh((rot + rot.mT) / 2)
    theta = torch.arccos(cos_t.clamp(-1, 1))
    sin_t = torch.sin(theta)
    half = (cos_t < 0) & (sin_t < 1e-7)
    if (half.sum(dim=-1) % 2).any():
        raise ValueError(
            "this adapter is a reflection (det H = -1: plain HRA, or the paper's strictly orthogonal form, with odd "
            "r), so no real orthogonal fractional power exists; use strength 0 or 1, or train with an even r or the "
            "identity_start strictly orthogonal form"
        )
    ratio = torch.sin(a * theta) / sin_t.clamp_min(1e-12)  # sin(a theta) / sin(theta), -> a as theta -> 0
    scale = torch.where(sin_t > 1e-12, ratio, a.expand_as(theta))
    skew = e.mT @ ((rot - rot.mT) / 2) @ e
    k_power = torch.diag_embed(torch.cos(a * theta)) + (scale[..., :, None] + scale[..., None, :]) / 2 * skew
    if half.any():  # rare (a vector turned exactly half-way): fix those planes item by item
        flat, flat_half, flat_a = k_power.reshape(-1, k, k), half.reshape(-1, k), a.reshape(-1)
        for b in torch.nonzero(flat_half.any(dim=-1)).flatten().tolist():
            idx = torch.nonzero(flat_half[b]).flatten().tolist()
            ca, sa = torch.cos(torch.pi * flat_a[b]), torch.sin(torch.pi * flat_a[b])
            for i, j in zip(idx[0::2], idx[1::2]):
                flat[b, i, :] = flat[b, :, i] = flat[b, j, :] = flat[b, :, j] = 0
                flat[b, i, i] = flat[b, j, j] = ca
                flat[b, j, i], flat[b, i, j] = sa, -sa
        k_power = flat.reshape(k_power.shape)
    return q.to(v.dtype), (eye - e @ k_power @ e.mT).to(v.dtype)


def fractional_factors_batch(
    us: list[Tensor], strengths: list[float], u0s: list[Tensor] | None = None, *, gram_schmidt: bool = False
) -> list[tuple[Tensor, Tensor]]:
    """float32 factors of H^strength for many adapters of one shape and kind (no graph: for sampling), computed in
    float64 like the per-layer path, in one batch."""
    u0 = None if u0s is None else torch.stack(u0s).double()
    v, s = hra_factors(torch.stack(us).double(), u0, gram_schmidt=gram_schmidt)
    v, s = fractional_factors(v, s, torch.tensor(strengths, dtype=torch.float64, device=v.device))
    return [(vi.float(), si.float()) for vi, si in zip(v.unbind(), s.unbind())]
