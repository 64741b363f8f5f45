"""The overrides the DP scripts add on clothing, for every privacy level, the no-DP baseline included.

``train.class_weights`` from the public prior (82 % of the reviews recommend; about 1 / prior:
4.5 for "0", 1 for "1"). Clipping gives every row the same force whatever its loss, so
unweighted DP-SGD settles on the majority class: measured with 5 rounds x 12 steps x batch 16,
DP-SGD with no noise at all (z = 1e-6, C = 1) gave the majority-class model (macro-F1 0.450) in
every round. Fixed weights cost no privacy and, under DP, scale each row's *clipped* gradient
(:func:`lorafed.client.dp.clip_and_weight_rows`). Without DP they took the same federation out
of the majority class from round 1 (0.617, 0.789, 0.808, 0.712, 0.792 over rounds 1-5, against
0.45, 0.45, 0.781, 0.785, 0.765 unweighted).

Plus the best DP recipe measured so far: FFA-LoRA (``federation.aggregation=ffa``: A frozen, so
half the LoRA coordinates carry noise) at an expected batch of 64 x 6 steps per round instead of
16 x 12 (the noise on the mean gradient is z C / B, and z grows far slower than B for a fixed
epsilon). At epsilon 8 (5 rounds, noise seed 0) it rose every round to macro-F1 0.587, where
plain LoRA at batch 16 with the same weights swung between 0.17 and 0.55 (both collapses: all
"recommend", or all "not"), against 0.792 without DP for plain LoRA at batch 16.

Tried and not kept (``federation.aggregation=head``, batch 128 x 4 steps, learning rate 1e-2,
same weights): the frozen backbone's pooled [CLS] features are too weak for a linear probe
(no-DP baseline 0.498 against 0.416 untrained), so a small DP cost against it means nothing.
"""

from __future__ import annotations

#: The public class weights alone: the plain-LoRA reference without DP (``dp_record_accuracy.py --levels plain``).
CLOTHING_CLASS_WEIGHTS: list[str] = ['train.class_weights={"0": 4.5, "1": 1.0}']
#: Overrides of ``configs/clothing_recommend.yaml`` for the DP scripts (every privacy level, no DP included).
CLOTHING_DP_RECIPE: list[str] = [
    *CLOTHING_CLASS_WEIGHTS,
    "federation.aggregation=ffa",
    "train.batch_size=64",
    "train.max_steps=6",
]
#: ``--tiny``: synthetic labels, no public prior: nothing to add.
TINY_DP_RECIPE: list[str] = []
