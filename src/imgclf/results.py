"""What a prediction returns, shared by the PyTorch and the ONNX predictors (no PyTorch here)."""
from __future__ import annotations

from dataclasses import dataclass, field

UNKNOWN = "unknown"  # the label given below the confidence threshold


@dataclass
class FilePrediction:
    """The top-k of one file, or why it could not be read."""

    path: str
    labels: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str = ""
    label: str = ""  # the decision: the top label, or "unknown" below the confidence threshold

    def to_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "top": [{"label": lab, "prob": round(p, 6)} for lab, p in
                                                                zip(self.labels, self.probs)]}
