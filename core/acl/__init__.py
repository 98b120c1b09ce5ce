"""ACL (Park et al., WACV 2024): BEATs audio tokens in CLIP's text encoder, CLIPSeg masks, ACL losses."""

from __future__ import annotations

from typing import Any

from torch import nn

from avloc.core.acl.model import ACL, ACLConfig


def build_acl_model(model_config: dict[str, Any]) -> nn.Module:
    """Randomly initialised ACL of the given architecture (``avloc.core.checkpoint.build_model`` for "acl");
    weights come from a checkpoint or :func:`avloc.core.acl.weights.load_pretrained`."""
    from avloc.core.acl.model import build_model

    return build_model(model_config)


__all__ = ["ACL", "ACLConfig", "build_acl_model"]
