"""kleinserve: a self-hosted, fal-compatible inference service for FLUX.2 [klein] 9B base."""

__version__ = "0.1.0"
