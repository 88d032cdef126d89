"""What the engine trains: the network and its criterion in one module.

The criterion sits inside the engine's module so that its parameters (Proxy-Anchor's proxies) are
optimised, averaged over ranks and partitioned by ZeRO like the network's. The teacher is not in
here: it is frozen and runs outside the engine, and its embeddings arrive as the forward's target.

Each task declares its parameters' roles (`parameter_roles()`): `backbone` (the pretrained network),
`new` (the embedding head, a transfer loss's own layers) and `proxies` (the supervised loss's proxies).
The engine (rct_dist/train/engine.py `param_groups`) builds its optimizer groups from that declaration,
not from attribute names.
"""

from __future__ import annotations

import torch
from torch import nn

Roles = dict[str, list[tuple[str, nn.Parameter]]]


def _roles(module: nn.Module, net: nn.Module, proxies: nn.Module | None) -> Roles:
    """`net.backbone`'s parameters (if the net has one) -> backbone, `proxies`' -> proxies, the rest of
    `module`'s -> new; each as (name in `module`, parameter), in `module.named_parameters()` order."""
    backbone = getattr(net, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    proxy_ids = {id(p) for p in proxies.parameters()} if proxies is not None else set()
    roles: Roles = {"backbone": [], "new": [], "proxies": []}
    for name, p in module.named_parameters():
        roles["proxies" if id(p) in proxy_ids else "backbone" if id(p) in backbone_ids else "new"].append((name, p))
    return roles


class WithLoss(nn.Module):
    """`forward(x, target) -> loss` for one criterion `criterion(net(x), target)`."""

    def __init__(self, net: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.criterion = criterion

    def parameter_roles(self) -> Roles:
        """`net.backbone` (if any) -> backbone, the criterion's parameters -> proxies, the rest -> new."""
        return _roles(self, self.net, self.criterion)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.net(x), target)


class TransferTask(nn.Module):
    """Student + transfer loss against teacher embeddings, optionally + a supervised loss on labels.

    `forward(images, labels, teacher_embeddings)` returns `(loss, parts, student_embeddings)`: parts are
    detached global values for logging; the embeddings (detached) feed the logged teacher/student
    distance correlation. For teacher training (`transfer=None`) only the supervised loss is used.
    """

    def __init__(
        self,
        net: nn.Module,
        transfer: nn.Module | None = None,
        supervised: nn.Module | None = None,
        supervised_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if transfer is None and supervised is None:
            raise ValueError("a task needs a transfer loss, a supervised loss, or both")
        self.net = net
        self.transfer = transfer
        self.criterion = supervised  # the name is in checkpoints and exports (`criterion.proxies`): keep it
        self.supervised_weight = supervised_weight
        self.backbone_frozen = False  # warm-up of the new layers: no gradient into `net.backbone`

    def parameter_roles(self) -> Roles:
        """`net.backbone` -> backbone; the supervised loss's parameters (Proxy-Anchor's proxies) -> proxies;
        the rest (the embedding head, a transfer loss's layers such as the regression map) -> new."""
        return _roles(self, self.net, self.criterion)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The student's embeddings; while `backbone_frozen`, its backbone runs without autograd (as
        with requires_grad off in the reference code: no backward through it, nothing to update)."""
        backbone, head = getattr(self.net, "backbone", None), getattr(self.net, "head", None)
        if not self.backbone_frozen or backbone is None or head is None:
            return self.net(images)
        with torch.no_grad():
            features = backbone(images)
        return head(features)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        embeddings = self.embed(images)
        total = embeddings.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        if self.transfer is not None:
            if teacher is None:
                raise ValueError("a transfer task needs teacher embeddings")
            loss, transfer_parts = self.transfer(embeddings, teacher, return_parts=True)
            total = total + loss
            parts.update({f"transfer/{k}": v for k, v in transfer_parts.items()})
            parts["transfer"] = loss.detach()
        if self.criterion is not None:
            loss = self.criterion(embeddings, labels)
            weight = self.supervised_weight if self.transfer is not None else 1.0
            total = total + weight * loss
            parts["supervised"] = loss.detach()
        return total, parts, embeddings.detach()
