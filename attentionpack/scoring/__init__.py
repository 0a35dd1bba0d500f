"""Token and head importance scores: observation-window attention (SnapKV) and retrieval heads (RazorAttention)."""
