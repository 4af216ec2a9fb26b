"""Structured shrinking: remove whole units so tensors get physically smaller.

```python
import sparsecraft as sc
from sparsecraft.structured import ShrinkConfig, shrink_

model, tok = sc.models.load("smollm2-135m")
calib = sc.data.calibration(tok, samples=32, seq_len=512)
report = shrink_(model, ShrinkConfig(mlp=0.5, criterion="wanda"), calib)
print(report)                      # per layer: units before -> after, parameters
sc.save(model, "shrunk/", tokenizer=tok)
model = sc.load("shrunk/")         # rebuilt from config, resized from the shape record
```

Units: MLP intermediate channels, attention heads (GQA-aware: a key/value group goes with
all its query heads; ``query_heads`` removes the same number inside every group), conv
filters (with BatchNorm and the next layer's input channels, found through ``torch.fx``).
Criteria: ``magnitude`` (L2), ``wanda`` (|W| * ||X||, calibration), ``taylor`` (|w * grad|,
calibration and a loss). See :mod:`.config` for the fields and the rounding rule.
:func:`shrink_pretrained` shrinks a Hugging Face folder larger than memory block by block
(magnitude and wanda; :mod:`.stream`).
"""

from .config import CRITERIA, ShrinkConfig
from .groups import FAMILIES, Family, Slice, UnitGroup, register_family
from .resize import SHAPES_ATTR, apply_shapes_, get_shapes
from .shrink import LayerShrink, ShrinkError, ShrinkPlan, ShrinkReport, plan_shrink, shrink_, zero_units_

__all__ = [
    "ShrinkConfig", "CRITERIA", "shrink_", "shrink_pretrained", "plan_shrink", "ShrinkPlan", "ShrinkReport", "LayerShrink",
    "ShrinkError", "zero_units_", "Slice", "UnitGroup", "Family", "FAMILIES", "register_family",
    "SHAPES_ATTR", "apply_shapes_", "get_shapes",
]


def __getattr__(name: str):
    # the streaming shrink pulls in the checkpoint writer: imported on first use, so that
    # importing the structured package (resize, shapes) does not import the checkpoint
    if name == "shrink_pretrained":
        from .stream import shrink_pretrained

        return shrink_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
