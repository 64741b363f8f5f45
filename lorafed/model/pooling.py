"""Mean pooling written as one more BERT layer, so the model stays a plain ``BertForSequenceClassification``.

BERT's classifier reads the pooled [CLS] token: ``tanh(W_p h_cls + b_p)``. A sentence
transformer such as all-MiniLM-L6-v2 was trained to average its token states instead, and its
[CLS] pooler was never trained for that model: on clothing reviews (features of the int8 MiniLM,
every training row) a logistic regression scores 0.769 test macro-F1 on the LayerNorm'd mean of
the token states and 0.692 on the pooled [CLS]. A custom pooling module
would not load in plain transformers, so :func:`append_mean_pooling_layer` adds a frozen
transformer layer whose weights compute the mean instead:

* query and key weights and biases 0: every attention score is 0, so each head attends
  uniformly to the tokens the attention mask keeps (padding excluded);
* value = identity: the attention output at [CLS] is the mean of the token states ``m``;
* attention output dense = ``lam`` x identity, then the layer's residual and LayerNorm
  (gain 1, bias 0): ``LN(lam m + h_cls)``, which is ``LN(m)`` up to a 1 / ``lam`` share of
  [CLS]'s own state (LayerNorm does not see the scale);
* feed-forward output 0: the second LayerNorm returns its input unchanged;
* pooler dense = ``POOLER_GAIN`` x identity, bias 0: ``tanh`` stays near linear on the
  LayerNorm's unit-variance coordinates, so the head reads ``~0.05 LN(m)``, a feature of norm
  about 1, like the pooled [CLS] it replaces.

The layer and the pooler are frozen like the rest of the backbone and are saved with it: an
exported model loads in plain transformers with ``num_hidden_layers`` one more than the base's.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from lorafed.errors import ModelError

logger = logging.getLogger(__name__)

#: The weight of the mean against [CLS]'s own state in the pooling layer's residual sum.
MEAN_WEIGHT = 1000.0
#: The pooler's gain: tanh(0.05 x) is within 1% of 0.05 x for |x| < 3.5 (LayerNorm'd coordinates).
POOLER_GAIN = 0.05


def bert_parts(model: Any) -> tuple[Any, Any, Any]:
    """The encoder layer list, the pooler and the config of a BERT-family sequence classifier."""
    base = getattr(model, "base_model", None)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    pooler = getattr(base, "pooler", None)
    if layers is None or len(layers) == 0 or pooler is None or not hasattr(pooler, "dense"):
        raise ModelError(
            f"model.pooling: mean needs a BERT-style encoder with a [CLS] pooler; {type(model).__name__} has none"
        )
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    parts += ("attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
    try:
        for part in parts:
            layers[-1].get_submodule(part)
    except AttributeError as exc:
        raise ModelError(f"model.pooling: mean: {type(layers[-1]).__name__} is not a BERT layer ({exc})") from exc
    return layers, pooler, model.config


def keep_first_layers(model: Any, n: int) -> None:
    """Drop every transformer layer of ``model`` above the first ``n`` (``model.num_layers``).

    Raises:
        ModelError: The model has no BERT-style encoder layer list, or fewer than ``n`` layers.
    """
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"model.num_layers: needs a BERT-style encoder; {type(model).__name__} has none")
    if not 1 <= n <= len(layers):
        raise ModelError(f"model.num_layers {n}: the backbone has {len(layers)} layers")
    del layers[n:]
    model.config.num_hidden_layers = n
    logger.debug("kept the backbone's first %d layers", n)


def _fill(linear: torch.nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.zero_()


def append_mean_pooling_layer(model: Any) -> int:
    """Append the mean-pooling layer and set the pooler (see the module docstring); call on fp32 weights.

    Args:
        model: A ``*ForSequenceClassification`` of the BERT family, before quantization and LoRA.

    Returns:
        The index of the new layer (the base's number of layers).

    Raises:
        ModelError: The model has no BERT-style encoder layers or [CLS] pooler.
    """
    layers, pooler, config = bert_parts(model)
    hidden = config.hidden_size
    layer = copy.deepcopy(layers[-1])
    eye = torch.eye(hidden)
    attn = layer.attention
    _fill(attn.self.query, torch.zeros(hidden, hidden))
    _fill(attn.self.key, torch.zeros(hidden, hidden))
    _fill(attn.self.value, eye)
    _fill(attn.output.dense, MEAN_WEIGHT * eye)
    _fill(layer.intermediate.dense, torch.zeros_like(layer.intermediate.dense.weight))
    _fill(layer.output.dense, torch.zeros_like(layer.output.dense.weight))
    with torch.no_grad():
        for norm in (attn.output.LayerNorm, layer.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    index = len(layers)
    for module in layer.modules():  # the copied layer's own index (attention caches, if any)
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    layers.append(layer)
    config.num_hidden_layers = index + 1
    _fill(pooler.dense, POOLER_GAIN * eye)
    logger.debug("mean pooling: layer %d appended, pooler set to %.2g x identity", index, POOLER_GAIN)
    return index
