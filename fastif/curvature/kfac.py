"""K-FAC and EK-FAC: the Gauss-Newton matrix in per-parameter Kronecker blocks, fitted once per model.

For a matrix parameter W [out, in] whose per-example gradient is Σ_t l_t r_tᵀ (a
Linear weight: l = δ, the gradient at its output, r = x, its input; the folded keys
and values of fastif/first_token.py: one pair per head), the Gauss-Newton block is
approximated by A ⊗ G with

    A = E_i Σ_t r_t r_tᵀ            G = E_i (1/T) Σ_t l_t l_tᵀ

taken over the training examples z_i and, for the output side, over the labels
y ~ p(y | x_i) *exactly*: with a handful of classes the expectation is a sum
weighted by the model's probabilities, so E_y[∇z L ∇z Lᵀ] = diag(p) − ppᵀ and the
result is the Gauss-Newton matrix itself, with no sampling noise. K-FAC's
eigenvalues are the products of A's and G's; EK-FAC (George et al. 2018, as in
Kronfluence) keeps their eigenvectors Q_A, Q_G and refits the eigenvalues to the
per-example gradients, Λ = E_i E_y (Q_Gᵀ ∇W L Q_A)², which is the exact diagonal of
the block in that basis. Then

    (C_W + λI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) / (Λ + wd + λ)] Q_Aᵀ

costs four small matrix products per block: a query's s_test without LiSSA.

A bias whose gradient is the sum of its weight's output-side factors (a Linear's
bias, and the folded value bias) joins its weight's block as one more input column
whose input is always 1, as Kronfluence does: [W | b] is one Kronecker block, so
the bias shares the weight's eigenbasis and damping. (Fitted as diagonal blocks of
their own, the biases' few small eigenvalues, divided by a small λ, dominated the
scores: LDS 0.50 on SST-2, against 0.63 with the bias components left out.) Other
parameters (LayerNorm scales and shifts, the key bias, whose gradient softmax makes
exactly zero) are their own *diagonal* blocks, Λ = E_i E_y (∇θ L)², the exact
diagonal of the Gauss-Newton matrix over them. With weight decay the L2 term wd is
added to the joined bias column too (biases are not decayed): a small approximation. A parameter that no recorded use covers (a shape
this module does not know) is preconditioned by the mean eigenvalue of the rest, a
damped identity; ``KroneckerFactors.uncovered`` names them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..encoding import Batch
from ..errors import CancelledError
from ..factored import Tape, Use, recording

FACTORS_VERSION = 2
Forward = Callable[[Batch, torch.Tensor | None, Tape], torch.Tensor]
"""``forward(batch, hidden, tape) -> logits`` with the uses of the influence parameters recorded on ``tape``."""


@dataclass
class KroneckerBlock:
    q_a: torch.Tensor  # [in(+1), in(+1)] eigenvectors of A (the last input is the joined bias's constant 1)
    eig_a: torch.Tensor  # [in(+1)]
    q_g: torch.Tensor  # [out, out] eigenvectors of G
    eig_g: torch.Tensor  # [out]
    corrected: torch.Tensor | None = None  # [out, in(+1)] EK-FAC's eigenvalues in the Q_G ⊗ Q_A basis
    bias: int | None = None  # position of the bias joined as the last input column, if any

    def eigenvalues(self, kind: str) -> torch.Tensor:
        if kind == "kfac":
            return torch.outer(self.eig_g, self.eig_a).clamp_min(0.0)
        return self.corrected


@dataclass
class KroneckerFactors:
    """The fitted blocks of every influence parameter, by position in the engine's flat order."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    kronecker: dict[int, KroneckerBlock]
    diagonal: dict[int, torch.Tensor]  # position -> Λ with the parameter's shape
    examples: int
    uncovered: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def joined(self) -> dict[int, int]:
        """Bias position -> the position of the weight whose block holds it."""
        return {b.bias: pos for pos, b in self.kronecker.items() if b.bias is not None}

    def trace(self, kind: str = "ekfac") -> float:
        """tr of the fitted curvature over the covered parameters (EK-FAC: exactly that of the block diagonal)."""
        total = sum(float(b.eigenvalues(kind).double().sum()) for b in self.kronecker.values())
        return total + sum(float(d.double().sum()) for d in self.diagonal.values())

    def mean_eigenvalue(self, kind: str = "ekfac") -> float:
        covered = self.num_params - sum(int(torch.Size(self.shapes[self.names.index(n)]).numel()) for n in self.uncovered)
        return self.trace(kind) / max(covered, 1)

    def block_means(self, kind: str = "ekfac") -> list[float]:
        """Each parameter's mean eigenvalue (its block's trace over its size); uncovered ones get the overall mean."""
        overall = self.mean_eigenvalue(kind)
        means, joined = [], self.joined
        for position, shape in enumerate(self.shapes):
            position = joined.get(position, position)
            if position in self.kronecker:
                means.append(float(self.kronecker[position].eigenvalues(kind).double().mean()))
            elif position in self.diagonal:
                means.append(float(self.diagonal[position].double().mean()))
            else:
                means.append(overall)
        return means

    def inverse_apply(self, vectors: torch.Tensor, damping: float | Sequence[float], decay: Sequence[float],
                      kind: str = "ekfac") -> torch.Tensor:
        """(C + λI)⁻¹ v for each row of ``vectors`` [m, P], C the fitted curvature plus the L2 term (``decay[pos]`` = wd or 0).

        ``damping`` is one λ, or one per parameter (``block_means`` × a ratio: Kronfluence's per-module heuristic).
        """
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        out = torch.empty_like(vectors)
        fallback = self.mean_eigenvalue(kind)
        dampings = [float(damping)] * len(sizes) if isinstance(damping, (int, float)) else [float(d) for d in damping]
        chunks, targets = torch.split(vectors, sizes, dim=1), torch.split(out, sizes, dim=1)
        joined = self.joined
        for position, (chunk, target) in enumerate(zip(chunks, targets)):
            shift = dampings[position] + float(decay[position])
            if position in joined:
                continue  # solved with its weight's block
            if position in self.kronecker:
                block = self.kronecker[position]
                v = chunk.reshape(len(vectors), *self.shapes[position]).to(block.q_a.dtype)
                if block.bias is not None:
                    v = torch.cat([v, chunks[block.bias].to(v.dtype).unsqueeze(-1)], dim=-1)
                rotated = block.q_g.T @ v @ block.q_a
                solved = block.q_g @ (rotated / (block.eigenvalues(kind) + shift)) @ block.q_a.T
                if block.bias is not None:
                    targets[block.bias].copy_(solved[..., -1])
                    solved = solved[..., :-1]
                target.copy_(solved.reshape(len(vectors), -1))
            elif position in self.diagonal:
                target.copy_(chunk / (self.diagonal[position].reshape(1, -1) + shift))
            else:
                target.copy_(chunk / (fallback + shift))
        return out

    # -- storage: safetensors beside the other artefacts ---------------------------------
    def save(self, path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for position, block in self.kronecker.items():
            name = self.names[position]
            tensors.update({f"kron.{name}.q_a": block.q_a, f"kron.{name}.eig_a": block.eig_a,
                            f"kron.{name}.q_g": block.q_g, f"kron.{name}.eig_g": block.eig_g,
                            f"kron.{name}.corrected": block.corrected})
        for position, values in self.diagonal.items():
            tensors[f"diag.{self.names[position]}"] = values
        meta = {"version": FACTORS_VERSION, "names": self.names, "shapes": [list(s) for s in self.shapes],
                "examples": self.examples, "uncovered": self.uncovered,
                "joined": {self.names[b]: self.names[w] for b, w in self.joined.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"fastif": json.dumps(meta)})
        partial.replace(path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> KroneckerFactors | None:
        """The factors at ``path``, or None when absent or written by another version."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["fastif"])
        if meta.get("version") != FACTORS_VERSION:
            return None
        tensors = load_file(str(path))
        names = meta["names"]
        bias_of = {weight: names.index(bias) for bias, weight in meta.get("joined", {}).items()}
        kronecker, diagonal = {}, {}
        for position, name in enumerate(names):
            if f"kron.{name}.q_a" in tensors:
                kronecker[position] = KroneckerBlock(*(tensors[f"kron.{name}.{part}"] for part in
                                                       ("q_a", "eig_a", "q_g", "eig_g", "corrected")),
                                                     bias=bias_of.get(name))
            elif f"diag.{name}" in tensors:
                diagonal[position] = tensors[f"diag.{name}"]
        return cls(names=names, shapes=[tuple(s) for s in meta["shapes"]], kronecker=kronecker, diagonal=diagonal,
                   examples=meta["examples"], uncovered=meta["uncovered"])


def _uses_by_position(tape: Tape, position: dict[int, int]) -> dict[int, list[Use]]:
    grouped: dict[int, list[Use]] = {}
    for use in tape.uses:
        if id(use.param) in position:
            grouped.setdefault(position[id(use.param)], []).append(use)
    return grouped


def _per_example_gradient(uses: list[Use], grads: dict[int, torch.Tensor], shape, rows: torch.Tensor) -> torch.Tensor:
    """[n, numel] per-example gradients of a small parameter: the Jacobian of its (linear) contractions."""
    zero = torch.zeros(shape, dtype=grads[id(uses[0].output)].dtype, device=rows.device)

    def contracted(s: torch.Tensor) -> torch.Tensor:
        return sum(use.contract(s, grads[id(use.output)], rows) for use in uses)

    return torch.func.jacrev(contracted)(zero).reshape(len(rows), -1)


def _pairs(uses: list[Use], grads: dict[int, torch.Tensor], rows: torch.Tensor,
           with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The weight's (left, right) factor pairs over all its uses; ``with_bias`` appends the joined bias's input 1."""
    lefts, rights = zip(*(use.pairs(grads[id(use.output)], rows) for use in uses))
    left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=1)
    if with_bias:
        right = torch.cat([right, torch.ones_like(right[..., :1])], dim=-1)
    return left, right, left.shape[1]


def _joined_biases(uses: dict[int, list[Use]], position: dict[int, int], shapes) -> dict[int, int]:
    """Weight position -> bias position, for each bias all of whose uses join one matrix weight with factor pairs."""
    joined = {}
    for pos, group in uses.items():
        weights = {id(u.joins) for u in group}
        if len(weights) != 1 or group[0].joins is None or id(group[0].joins) not in position:
            continue
        weight = position[id(group[0].joins)]
        weight_uses = uses.get(weight, [])
        if weight_uses and all(u.pairs is not None for u in weight_uses) and len(shapes[weight]) == 2:
            joined[weight] = pos
    return joined


class _Pass:
    """One forward of a batch with its uses recorded, and the per-class backward of each label's loss."""

    def __init__(self, forward: Forward, modules: Sequence[nn.Module], position: dict[int, int]):
        self.forward, self.modules, self.position = forward, modules, position

    def classes(self, batch: Batch, hidden: torch.Tensor | None):
        """Yields (uses by position, ∂L_c/∂outputs, p_c per example) for each class c."""
        tape = Tape()
        handles = recording(tape, self.modules)
        try:
            with torch.enable_grad():
                logits = self.forward(batch, hidden, tape)
        finally:
            for handle in handles:
                handle.remove()
        uses = _uses_by_position(tape, self.position)
        outputs = list({id(u.output): u.output for group in uses.values() for u in group}.values())
        probs = torch.softmax(logits.detach().double(), dim=-1).to(logits.dtype)
        classes = logits.shape[-1]
        for c in range(classes):
            target = torch.full((len(logits),), c, dtype=torch.long, device=logits.device)
            loss = F.cross_entropy(logits, target, reduction="sum")  # summed: each row's own gradient
            grads = torch.autograd.grad(loss, outputs, retain_graph=c < classes - 1)
            yield uses, dict(zip((id(o) for o in outputs), grads)), probs[:, c]


def fit_factors(
    forward: Forward,
    modules: Sequence[nn.Module],
    names: Sequence[str],
    params: Sequence[nn.Parameter],
    batches: Callable[[], Iterable[tuple[Batch, torch.Tensor | None]]],
    on_progress: Callable[[str, int, int], bool] | None = None,
    total_batches: int = 0,
) -> KroneckerFactors:
    """Fit K-FAC's factors and EK-FAC's eigenvalues over ``batches()`` (called twice: covariances, then eigenvalues)."""
    position = {id(p): i for i, p in enumerate(params)}
    shapes = [tuple(p.shape) for p in params]
    passes = _Pass(forward, modules, position)
    a_cov: dict[int, torch.Tensor] = {}
    g_cov: dict[int, torch.Tensor] = {}
    diagonal: dict[int, torch.Tensor] = {}
    kinds: dict[int, str] = {}
    bias_of: dict[int, int] | None = None  # weight position -> its joined bias, decided on the first batch
    count = 0

    def report(stage: str, done: int) -> None:
        if on_progress and on_progress(stage, done, total_batches):
            raise CancelledError(f"cancelled while fitting the curvature ({stage})")

    # Pass 1: the covariances A and G of the matrix blocks; the exact diagonal of the others.
    for number, (batch, hidden) in enumerate(batches()):
        rows = torch.arange(len(batch), device=batch.input_ids.device)
        for uses, grads, weight in passes.classes(batch, hidden):
            if bias_of is None:
                bias_of = _joined_biases(uses, position, shapes)
            joined_biases = set(bias_of.values())
            for pos, group in uses.items():
                if pos in joined_biases:
                    continue  # fitted as its weight's last input column
                kind = kinds.setdefault(pos, "kron" if all(u.pairs is not None for u in group) and len(shapes[pos]) == 2 else "diag")
                with torch.no_grad():
                    if kind == "kron":
                        left, right, tokens = _pairs(group, grads, rows, with_bias=pos in bias_of)
                        a = torch.einsum("nti,ntj,n->ij", right, right, weight)
                        g = torch.einsum("nti,ntj,n->ij", left, left, weight) / tokens
                        a_cov[pos] = a_cov.get(pos, 0) + a.double()
                        g_cov[pos] = g_cov.get(pos, 0) + g.double()
                    else:
                        per_example = _per_example_gradient(group, grads, shapes[pos], rows)
                        diagonal[pos] = diagonal.get(pos, 0) + (weight[:, None] * per_example**2).sum(0).double()
        count += len(batch)
        report("curvature factors", number + 1)
    if count == 0:
        raise ValueError("no training examples to fit the curvature on")

    kronecker: dict[int, KroneckerBlock] = {}
    for pos in a_cov:
        eig_a, q_a = torch.linalg.eigh(a_cov[pos] / count)
        eig_g, q_g = torch.linalg.eigh(g_cov[pos] / count)
        dtype = params[pos].dtype
        kronecker[pos] = KroneckerBlock(q_a=q_a.to(dtype), eig_a=eig_a.clamp_min(0).to(dtype),
                                        q_g=q_g.to(dtype), eig_g=eig_g.clamp_min(0).to(dtype), bias=(bias_of or {}).get(pos))

    # Pass 2: EK-FAC's eigenvalues, the second moments of the gradients in the Kronecker eigenbasis.
    corrected: dict[int, torch.Tensor] = {pos: torch.zeros(len(b.q_g), len(b.q_a), dtype=torch.float64)
                                          for pos, b in kronecker.items()}
    if kronecker:
        for number, (batch, hidden) in enumerate(batches()):
            rows = torch.arange(len(batch), device=batch.input_ids.device)
            for uses, grads, weight in passes.classes(batch, hidden):
                with torch.no_grad():
                    for pos, block in kronecker.items():
                        if pos not in uses:
                            continue
                        left, right, _ = _pairs(uses[pos], grads, rows, with_bias=block.bias is not None)
                        rotated = torch.einsum("nta,ntb->nab", left @ block.q_g, right @ block.q_a)
                        corrected[pos] += torch.einsum("n,nab->ab", weight, rotated**2).double().cpu()
            report("curvature eigenvalues", number + 1)
    for pos, block in kronecker.items():
        block.corrected = (corrected[pos] / count).to(block.q_a.dtype)
    covered = set(kronecker) | set(diagonal) | {b.bias for b in kronecker.values() if b.bias is not None}
    return KroneckerFactors(
        names=list(names), shapes=shapes, kronecker=kronecker,
        diagonal={pos: (values / count).to(params[pos].dtype).reshape(shapes[pos]) for pos, values in diagonal.items()},
        examples=count, uncovered=[n for i, n in enumerate(names) if i not in covered],
    )
