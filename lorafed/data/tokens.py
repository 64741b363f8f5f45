"""Split a client's rows into train/validation/test and tokenize rows once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorafed.data.clean import LabeledData


@dataclass(frozen=True)
class Split:
    """Row positions of one client's train, validation and test parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(indices: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Shuffle ``indices`` with ``seed`` and cut them into train, validation and test.

    Every part of a client with at least 3 rows is non-empty when its fraction is positive.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.asarray(indices, dtype=np.int64))
    n = len(perm)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if n >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_val = max(n_val, 1) if val_fraction > 0 else 0
    n_train = max(n - n_test - n_val, 0)
    return Split(
        train=np.sort(perm[:n_train]),
        val=np.sort(perm[n_train : n_train + n_val]),
        test=np.sort(perm[n_train + n_val :]),
    )


def model_inputs(
    texts: Sequence[str], pairs: Sequence[str] | None, pair_mode: str
) -> tuple[list[str], list[str] | None]:
    """The tokenizer's (first, second) inputs: the one place the pair/prefix rule lives.

    ``pair`` keeps the two texts as a BERT sentence pair; ``prefix`` puts the second text in front
    of the first as ``"second. first"`` (a missing second text leaves the first alone). Training,
    ``predict``, ``serve`` and the export's model card all follow this rule.
    """
    first = list(texts)
    if pairs is None:
        return first, None
    if pair_mode == "prefix":
        return [f"{p}. {t}" if p else t for t, p in zip(first, pairs, strict=True)], None
    return first, list(pairs)


class TokenizedRows:
    """Every row tokenized once; clients and rounds slice it by position (no re-tokenizing)."""

    def __init__(self, data: LabeledData, tokenizer: Any, max_length: int, pair_mode: str = "pair") -> None:
        first, second = model_inputs(data.texts, data.pairs, pair_mode)
        enc = tokenizer(
            first,
            second,
            truncation=True if second is None else "longest_first",
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
        )
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.token_type_ids: list[list[int]] | None = enc.get("token_type_ids")
        self.labels = torch.as_tensor(data.labels, dtype=torch.long)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, positions: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Pad the rows at ``positions`` to their longest and return model inputs with labels."""
        pos = [int(i) for i in positions]
        width = max(len(self.input_ids[i]) for i in pos)
        ids = torch.full((len(pos), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pos), width), dtype=torch.long)
        types = torch.zeros((len(pos), width), dtype=torch.long)
        for r, i in enumerate(pos):
            seq = self.input_ids[i]
            ids[r, : len(seq)] = torch.as_tensor(seq)
            mask[r, : len(seq)] = 1
            if self.token_type_ids is not None:
                types[r, : len(seq)] = torch.as_tensor(self.token_type_ids[i])
        out = {"input_ids": ids, "attention_mask": mask, "labels": self.labels[pos]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = types
        return out

    def lengths(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The token count of each row at ``positions``."""
        return np.array([len(self.input_ids[int(i)]) for i in positions], dtype=np.int64)

    def position_batches(
        self, positions: np.ndarray, batch_size: int, shuffle_seed: int | None = None
    ) -> Iterator[np.ndarray]:
        """Yield ``positions`` in batches of ``batch_size``, shuffled by ``shuffle_seed`` if given."""
        pos = np.asarray(positions, dtype=np.int64)
        if shuffle_seed is not None:
            pos = np.random.default_rng(shuffle_seed).permutation(pos)
        for start in range(0, len(pos), batch_size):
            yield pos[start : start + batch_size]

    def batches(
        self, positions: np.ndarray, batch_size: int, shuffle_seed: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield padded batches over ``positions``, shuffled by ``shuffle_seed`` if given."""
        for chosen in self.position_batches(positions, batch_size, shuffle_seed):
            yield self.batch(chosen)
