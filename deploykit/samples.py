"""One engine input set, whatever the architecture.

Each architecture provides ``make_sample(config, seed, model) -> Sample``
(see deploykit.models.ARCHITECTURES). ``feeds`` are the static-shape engine
inputs of ``model`` (the rewritten one: its input layout may differ);
``reference`` are the inputs the original, un-rewritten model takes for the
same data (CenterPoint's original sees unpadded pillars), so checks compare
the deployed path with the model as released.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Sample:
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)


def torch_outputs(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = model(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in model.input_names))
    return {name: t.numpy() for name, t in zip(model.output_names, outs)}
