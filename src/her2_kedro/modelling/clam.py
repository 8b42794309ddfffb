"""CLAM (Lu et al., Nature Biomedical Engineering 2021), written here from the paper's description.

Clustering-constrained attention MIL on a bag of tile embeddings ``(N, D)``: ``h = fc(x)``
(``Linear(D, embed_dim)``, ReLU, dropout), gated attention ``embed_dim -> attn_dim -> branches``
(tanh and sigmoid branches, dropout), softmax over the bag's tiles, bag embedding ``a @ h``.

* CLAM-SB: one attention branch and one bag classifier ``Linear(embed_dim, n_classes)``.
* CLAM-MB: one attention branch per class; class ``c``'s score is its own ``Linear(embed_dim, 1)``
  on its own bag embedding ``a_c @ h``.

Instance-level clustering (training only): per class one instance classifier
``Linear(embed_dim, 2)``. For the bag's true class ``y``, the ``k`` most attended tiles (branch
``y`` for MB, the single branch for SB) are pseudo-positives and the ``k`` least attended
pseudo-negatives for classifier ``y``; with mutually exclusive classes (``subtyping``, our case:
IHC score 0..3, HER2 negative/positive) the ``k`` tiles most attended by branch ``c`` (MB) or the
single branch (SB) are also pseudo-negatives for classifier ``c != y``. The training loss is
``bag_weight * CE(bag) + (1 - bag_weight) * instance loss`` (mean over the classes evaluated; CE
or the smooth top-1 SVM of Berrada et al. 2018).

Small bags (TMA cores can have few tissue tiles): the in-class term uses
``k_eff = min(k, N // 2)`` so top and bottom tiles never overlap (none for ``N < 2``), the
out-of-class term ``min(k, N)``; when no instance term can be formed the loss is the bag CE.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLAM",
    "CLAMOutput",
    "MultiBranchGatedAttention",
    "build_clam",
    "instance_targets",
    "smooth_top1_svm_loss",
]


class CLAMOutput(NamedTuple):
    """One bag's CLAM output.

    ``logits`` ``(n_classes,)``; ``attention`` ``(N,)``, the one attention vector per tile for
    heatmaps (SB: its single branch; MB: the branch of the predicted class); ``features`` ``(N,
    embed_dim)``, the tiles after ``fc`` (the instance classifiers' input); ``branch_attention``
    ``(n_branches, N)``, every branch's softmaxed attention (each row sums to 1).
    """

    logits: torch.Tensor
    attention: torch.Tensor
    features: torch.Tensor
    branch_attention: torch.Tensor


class MultiBranchGatedAttention(nn.Module):
    """Gated attention scores ``w(tanh(V h) * sigmoid(U h))`` with ``n_branches`` outputs."""

    def __init__(
        self, in_dim: int = 512, hidden_dim: int = 256, n_branches: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden_dim, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores ``(n_branches, N)`` for features ``(N, in_dim)``."""
        return self.w(self.V(h) * self.U(h)).T


def instance_targets(
    attention: torch.Tensor, k: int, in_class: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile indices and pseudo-labels for one instance classifier, from one branch's attention.

    In-class: the ``min(k, N // 2)`` most attended tiles (label 1) then as many least attended
    tiles (label 0); disjoint by construction (one stable sort). Out-of-class: the ``min(k, N)``
    most attended tiles, all label 0. Either may be empty (in-class for ``N < 2``).
    """
    n = attention.shape[0]
    order = torch.argsort(attention.detach(), descending=True, stable=True)
    if in_class:
        k_eff = min(k, n // 2)
        index = torch.cat([order[:k_eff], order[n - k_eff :]])
        labels = torch.cat([torch.ones(k_eff), torch.zeros(k_eff)])
    else:
        k_eff = min(k, n)
        index = order[:k_eff]
        labels = torch.zeros(k_eff)
    return index, labels.to(device=attention.device, dtype=torch.long)


def smooth_top1_svm_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Mean smooth top-1 SVM loss (Berrada et al. 2018) of ``logits (M, C)`` for ``target (M,)``.

    ``tau * logsumexp((s + alpha * [j != y] - s_y) / tau)``: a margin-``alpha`` multi-class hinge
    smoothed at temperature ``tau``. Written here because torchmil 1.0.2's ``SmoothTop1SVM`` fails
    on 1-d targets and returns negative losses for ``(M, 1)`` targets.
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    shifted = logits + margin - logits.gather(1, target[:, None])
    return (tau * torch.logsumexp(shifted / tau, dim=1)).mean()


class CLAM(nn.Module):
    """CLAM-SB (``variant="sb"``) or CLAM-MB (``"mb"``) over one bag of embeddings.

    ``forward`` returns :class:`CLAMOutput`; ``training_loss`` (used by the training loop in
    place of plain cross-entropy) adds the instance-clustering loss.
    """

    def __init__(
        self,
        n_classes: int,
        variant: str = "sb",
        in_dim: int = 512,
        embed_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        instance_loss: str = "ce",
        subtyping: bool = True,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"CLAM needs n_classes >= 2, got {n_classes}")
        if variant not in ("sb", "mb"):
            raise ValueError(f"variant must be 'sb' or 'mb', got {variant!r}")
        if instance_loss not in ("ce", "svm"):
            raise ValueError(f"instance_loss must be 'ce' or 'svm', got {instance_loss!r}")
        if k_sample < 1 or not 0.0 <= bag_weight <= 1.0:
            raise ValueError(
                f"need k_sample >= 1 and 0 <= bag_weight <= 1 ({k_sample}, {bag_weight})"
            )
        self.n_classes, self.variant, self.in_dim = n_classes, variant, in_dim
        self.k_sample, self.bag_weight = k_sample, bag_weight
        self.instance_loss_name, self.subtyping = instance_loss, subtyping
        self.fc = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        n_branches = 1 if variant == "sb" else n_classes
        self.attention = MultiBranchGatedAttention(embed_dim, attn_dim, n_branches, dropout)
        if variant == "sb":
            self.classifiers: nn.Module = nn.Linear(embed_dim, n_classes)
        else:
            self.classifiers = nn.ModuleList(nn.Linear(embed_dim, 1) for _ in range(n_classes))
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(n_classes))

    def forward(self, bag: torch.Tensor) -> CLAMOutput:
        """Logits, attention and tile features for embeddings ``(N, D)`` (or ``(1, N, D)``)."""
        if bag.dim() == 3 and bag.shape[0] == 1:
            bag = bag[0]
        if bag.dim() != 2 or bag.shape[1] != self.in_dim or bag.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty bag of shape (N, {self.in_dim}), got {tuple(bag.shape)}"
            )
        h = self.fc(bag)
        branch_attention = torch.softmax(self.attention(h), dim=1)  # (n_branches, N)
        embeddings = branch_attention @ h  # (n_branches, embed_dim)
        if self.variant == "sb":
            logits = self.classifiers(embeddings[0])
            heatmap = branch_attention[0]
        else:
            logits = torch.cat([clf(embeddings[c]) for c, clf in enumerate(self.classifiers)])
            heatmap = branch_attention[int(logits.detach().argmax())]
        return CLAMOutput(logits, heatmap, h, branch_attention)

    def _branch(self, branch_attention: torch.Tensor, c: int) -> torch.Tensor:
        """The attention that ranks tiles for instance classifier ``c`` (own branch for MB)."""
        return branch_attention[0] if self.variant == "sb" else branch_attention[c]

    def instance_loss(
        self, branch_attention: torch.Tensor, features: torch.Tensor, label: int
    ) -> torch.Tensor | None:
        """Mean instance-clustering loss over the classes that got pseudo-labelled tiles.

        In-class for ``label``; out-of-class for every other class when ``subtyping``. ``None``
        when no class has any pseudo-labelled tile (e.g. one tile without subtyping).
        """
        terms = []
        for c, classifier in enumerate(self.instance_classifiers):
            in_class = c == label
            if not in_class and not self.subtyping:
                continue
            index, targets = instance_targets(
                self._branch(branch_attention, c), self.k_sample, in_class
            )
            if index.numel() == 0:
                continue
            # float32: the loop calls training_loss outside its bf16 autocast
            logits = classifier(features[index].to(classifier.weight.dtype)).float()
            if self.instance_loss_name == "svm":
                terms.append(smooth_top1_svm_loss(logits, targets))
            else:
                terms.append(F.cross_entropy(logits, targets))
        return torch.stack(terms).mean() if terms else None

    def training_loss(self, output: CLAMOutput, target: torch.Tensor) -> torch.Tensor:
        """``bag_weight * CE(logits, y) + (1 - bag_weight) * instance loss`` for one bag.

        ``target`` holds the bag's one label (a 1-d long tensor, as the training loop passes it).
        Without any instance term (see :meth:`instance_loss`) the loss is the bag CE alone.
        """
        target = target.reshape(-1)
        if target.numel() != 1:
            raise ValueError(f"CLAM trains on one bag at a time, got {target.numel()} labels")
        bag_loss = F.cross_entropy(output.logits.float().reshape(1, -1), target)
        if self.bag_weight == 1.0:
            return bag_loss
        inst = self.instance_loss(output.branch_attention, output.features, int(target[0]))
        if inst is None:
            return bag_loss
        return self.bag_weight * bag_loss + (1.0 - self.bag_weight) * inst


def build_clam(variant: str, n_classes: int, **params: Any) -> CLAM:
    """Build CLAM from plain parameters (as stored in a checkpoint's meta, arch ``"clam"``); the
    keyword parameters are :class:`CLAM`'s."""
    return CLAM(n_classes, variant, **params)
