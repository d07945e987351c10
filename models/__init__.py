"""Reference PyTorch modules for every attention family attnc fuses, and small models.

Plain torch ops only, float32, exportable by both ONNX exporters (dynamo and
TorchScript). Attention modules map ``x [B, N, C]`` to the same shape (2-D / 3-D
neighborhood attention: ``[B, H, W, C]`` / ``[B, T, H, W, C]``) and own their q/k/v and output projections.
``attnc.models.registry`` names small (test) and realistic (benchmark) configurations.
"""

from attnc.models.agent import AgentAttention
from attnc.models.blocks import Block, CausalLM, VisionTransformer, make_attention
from attnc.models.flow import FlowAttention
from attnc.models.linear import LightningAttention, LinearAttention
from attnc.models.mhsa import MultiHeadSelfAttention
from attnc.models.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from attnc.models.registry import SPECS, ModelSpec, get_spec
from attnc.models.vlm import TinyVLM

__all__ = [
    "AgentAttention", "Block", "CausalLM", "FlowAttention", "LightningAttention", "LinearAttention",
    "ModelSpec", "MultiHeadSelfAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
    "NeighborhoodAttention3D", "SPECS",
    "TinyVLM", "VisionTransformer", "get_spec", "make_attention",
]
