"""Sentiment transfer (Radford et al. 2017): the mLSTM's cell state as features for a linear probe.

Each labelled text is run through the model as a fresh document; the cell state ``c`` right after its
last byte is its feature vector.  An L1-regularised logistic regression, its strength chosen on the
validation split, then says how linearly readable the label is from all units, and the unit with the
largest weight is the candidate "sentiment neuron", scored on its own.

Inputs are CSV or JSON lines with ``label`` and ``sentence`` fields; labels are any two distinct values,
mapped to 0/1 in sorted order.  Problems with an input raise :class:`TransferError` with one line that
names the file.
"""

from __future__ import annotations

import csv
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sklearn.linear_model import LogisticRegression

from mlstm_trainer.corpus import DOC_SEPARATOR
from mlstm_trainer.model import MLSTM
from mlstm_trainer.sampling import load_model

LABEL_COLUMN = "label"
TEXT_COLUMN = "sentence"
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")
C_GRID = tuple(2.0**k for k in range(-5, 5))
"""Inverse regularisation strengths tried, weakest L1 last (2^-5 .. 2^4)."""
DEFAULT_CHUNK_LEN = 256
"""Most time steps per forward call: bounds the [rows, steps, 4H] activations the model allocates."""


class TransferError(ValueError):
    """A labelled input file is unusable; the one-line message names the file and the problem."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelledTexts:
    """The texts of one input file and their labels as written there."""

    path: Path
    texts: list[str]
    labels: list[str]


# --- Reading -------------------------------------------------------------------------------------


def read_labelled(path: str | Path) -> LabelledTexts:
    """Read a CSV (or JSON lines: .jsonl/.ndjson/.json) file with `label` and `sentence` fields."""
    path = Path(path)
    try:
        if path.suffix.lower() in JSON_LINES_SUFFIXES:
            rows = _read_json_lines(path)
        else:
            rows = _read_csv(path)
    except OSError as err:
        raise TransferError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise TransferError(f"{path.name} is not UTF-8 text") from None
    if not rows:
        raise TransferError(f"{path.name} has no rows")
    texts, labels = [], []
    for line, row in rows:
        label, text = row.get(LABEL_COLUMN), row.get(TEXT_COLUMN)
        # csv gives None for a short row; JSON may hold null or a number.
        if label is None or str(label).strip() == "":
            raise TransferError(f"{path.name} line {line} has no '{LABEL_COLUMN}' value")
        if text is None:
            raise TransferError(f"{path.name} line {line} has no '{TEXT_COLUMN}' value")
        labels.append(str(label).strip())
        texts.append(str(text))
    return LabelledTexts(path=path, texts=texts, labels=labels)


def _require_columns(where: str, columns: Sequence[str], noun: str = "column") -> None:
    """Raise unless `columns` has both fields; `where` is the file (and line) named in the message."""
    for needed in (LABEL_COLUMN, TEXT_COLUMN):
        if needed not in columns:
            raise TransferError(f"{where} has no '{needed}' {noun} ({noun}s: {', '.join(columns) or 'none'})")


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs; utf-8-sig so a spreadsheet's byte-order mark is not part of a name."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise TransferError(f"{path.name} is empty")
        _require_columns(path.name, [name.strip() for name in reader.fieldnames])
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        try:
            return [(reader.line_num, row) for row in reader]
        except csv.Error as err:
            raise TransferError(f"{path.name} line {reader.line_num} is not valid CSV: {err}") from None


def _read_json_lines(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise TransferError(f"{path.name} line {number} is not a JSON object")
            _require_columns(f"{path.name} line {number}", list(row), noun="key")
            rows.append((number, row))
    if not rows:
        raise TransferError(f"{path.name} is empty")
    return rows


def _label_order(values: set[str]) -> list[str]:
    """Numeric labels in numeric order ("0" < "1", "-1" < "1"), others alphabetically ("neg" < "pos")."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def encode_labels(train: LabelledTexts, *others: LabelledTexts) -> tuple[list[str], list[np.ndarray]]:
    """Map the two label values of `train` to 0/1 and apply the same mapping to `others`.

    Returns the two names (index = class) and one int64 array per input, `train` first.
    """
    for data in (train, *others):
        distinct = _label_order(set(data.labels))
        if len(distinct) > 2:
            raise TransferError(f"{data.path.name} has {len(distinct)} distinct labels ({_short(distinct)}); need exactly 2")
    names = _label_order(set(train.labels))
    if len(names) != 2:
        raise TransferError(f"{train.path.name} has only one label ({names[0]}); need exactly 2")
    index = {name: i for i, name in enumerate(names)}
    encoded = []
    for data in (train, *others):
        unknown = sorted(set(data.labels) - set(names))
        if unknown:
            raise TransferError(f"{data.path.name} has label '{unknown[0]}', not one of {train.path.name}'s labels ({', '.join(names)})")
        encoded.append(np.array([index[label] for label in data.labels], dtype=np.int64))
    return names, encoded


def _short(values: list[str], limit: int = 5) -> str:
    shown = ", ".join(values[:limit])
    return shown + (", ..." if len(values) > limit else "")


# --- Features ------------------------------------------------------------------------------------


def document_bytes(text: str, max_chars: int | None = None) -> bytes:
    """A text as the trainer sees a document: DOC_SEPARATOR, then its UTF-8 bytes (the first `max_chars`)."""
    data = text.encode("utf-8")
    if max_chars is not None:
        data = data[:max_chars]
    return bytes([DOC_SEPARATOR]) + data


@torch.no_grad()
def featurise(
    model: MLSTM,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_chars: int | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """float32 [N, H]: each text's cell state right after its last byte, as if run alone.

    Texts are sorted by length so a batch holds similar lengths and little is wasted; `advance(n)` is
    called after each batch of n texts (a progress bar).
    """
    docs = [document_bytes(text, max_chars) for text in texts]
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]), reverse=True)
    device = next(model.parameters()).device
    features = np.zeros((len(docs), model.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        cells = final_cells(model, [docs[i] for i in rows], device=device, chunk_len=chunk_len)
        features[rows] = cells.float().cpu().numpy()
        if advance is not None:
            advance(len(rows))
    return features


def final_cells(model: MLSTM, docs: Sequence[bytes], *, device: torch.device, chunk_len: int) -> torch.Tensor:
    """[B, H] cell state after each document's last byte; `docs` must be sorted longest first.

    Longest first, the rows still running at any time step are a prefix of the batch.  The loop
    stops at every row's end (and at least every `chunk_len` steps), records the finished rows' state
    and drops them, so padding never enters the recurrence and each row's result is its own.
    """
    lengths = [len(doc) for doc in docs]
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("final_cells needs documents sorted longest first")
    tokens = torch.zeros((len(docs), lengths[0]), dtype=torch.long)
    for row, doc in enumerate(docs):
        tokens[row, : len(doc)] = torch.frombuffer(bytearray(doc), dtype=torch.uint8)
    tokens = tokens.to(device)
    h, c = model.init_state(len(docs), device=device)
    out = torch.empty_like(c)
    active, pos = len(docs), 0
    while active:
        end = min(pos + chunk_len, lengths[active - 1])
        _, (h, c) = model(tokens[:active, pos:end], (h, c))
        pos = end
        while active and lengths[active - 1] == pos:
            active -= 1
            out[active] = c[active]
        h, c = h[:active], c[:active]
    return out


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich bar on stderr yielding `advance(n)`; silent when stderr is not a terminal (logs, CI)."""
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


# --- Probe ---------------------------------------------------------------------------------------


def l1_logistic(c: float) -> LogisticRegression:
    """An L1-regularised logistic regression with inverse strength `c` (liblinear, deterministic)."""
    # scikit-learn 1.8 deprecated `penalty` (l1_ratio=1 now means L1); older versions need penalty="l1".
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", random_state=0)
    return LogisticRegression(C=c, penalty="l1", solver="liblinear", random_state=0)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeResult:
    """What the probes found; accuracies are fractions in [0, 1]."""

    c: float
    """The inverse regularisation strength chosen on the validation split."""
    val_accuracy: float
    test_accuracy: float
    """Test accuracy of the probe on all units."""
    nonzero_weights: int
    top_unit: int
    """The unit with the largest absolute weight (the candidate sentiment neuron)."""
    top_unit_weight: float
    """Its weight on the standardised feature; the sign says which label high values point to."""
    top_unit_accuracy: float
    """Test accuracy of a logistic regression fitted on the top unit alone (on train)."""


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    c_grid: Sequence[float] = C_GRID,
) -> ProbeResult:
    """Fit one L1 probe per C on `train`, keep the best on `val`, score it and its top unit on `test`.

    Each split is (features [N, H], labels [N] in {0, 1}); `c_grid` ascends.  Features are standardised with the train
    split's mean and deviation first: cell-state units differ in scale by more than 10x, L1 charges every
    weight the same, and liblinear converges several times faster on comparable columns.  The top unit
    is then the one that carries the most label per standard deviation.
    """
    scale = _standardiser(train[0])
    train, val, test = ((scale(x), y) for x, y in (train, val, test))
    fits = [l1_logistic(c).fit(*train) for c in c_grid]
    scores = [fit.score(*val) for fit in fits]
    # First best = smallest C among ties: the sparsest probe that does as well.
    best = fits[int(np.argmax(scores))]
    weights = best.coef_[0]
    if not np.any(weights):
        # Every unit was regularised away; the least regularised fit still says which unit matters most.
        weights = fits[-1].coef_[0]
    unit = int(np.argmax(np.abs(weights)))
    single = LogisticRegression().fit(train[0][:, [unit]], train[1])
    return ProbeResult(
        c=float(best.C),
        val_accuracy=float(max(scores)),
        test_accuracy=float(best.score(*test)),
        nonzero_weights=int(np.count_nonzero(best.coef_)),
        top_unit=unit,
        top_unit_weight=float(weights[unit]),
        top_unit_accuracy=float(single.score(test[0][:, [unit]], test[1])),
    )


def _standardiser(features: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping features to zero mean, unit deviation as measured on `features`."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std[std == 0] = 1.0  # a unit constant on train (dead, or a tiny set) stays constant, not NaN
    return lambda x: (x - mean) / std


def plot_unit_histogram(values: np.ndarray, labels: np.ndarray, names: Sequence[str], unit: int, path: Path) -> None:
    """Save a histogram of one unit's values, one colour per label (the 'sentiment neuron' picture)."""
    # Figure without pyplot: no global figure registry and no GUI backend, Agg renders the PNG.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    bins = np.histogram_bin_edges(values, bins=40)
    for cls, name in enumerate(names):
        axes.hist(values[labels == cls], bins=bins, alpha=0.6, label=f"label {name}")
    axes.set_title(f"unit {unit}")
    axes.set_xlabel("cell state after the last byte")
    axes.set_ylabel("texts")
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


# --- The whole transfer run ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TransferReport:
    """Result of `run_transfer`: the probe's numbers plus what they were computed on."""

    probe: ProbeResult
    labels: tuple[str, str]
    """Label values as written in the files; index = class (0, 1)."""
    counts: dict[str, int]
    """Texts per split: train, val, test."""
    hidden_size: int
    plot: Path | None


def run_transfer(
    checkpoint: str | Path,
    *,
    train: str | Path,
    val: str | Path,
    test: str | Path,
    device: str = "cpu",
    batch_size: int = 64,
    max_chars: int | None = None,
    plot: Path | None = None,
) -> TransferReport:
    """Read the three splits, featurise them with the checkpoint's model, fit the probes, plot.

    The files are read and checked before the model loads, so a bad file fails in a moment.
    Raises TransferError for a bad file and CheckpointError for a bad checkpoint.
    """
    splits = {"train": read_labelled(train), "val": read_labelled(val), "test": read_labelled(test)}
    names, encoded = encode_labels(splits["train"], splits["val"], splits["test"])
    model = load_model(checkpoint, device)
    features = {}
    for name, data in splits.items():
        with progress_bar(f"featurising {name}", len(data.texts)) as advance:
            features[name] = featurise(model, data.texts, batch_size=batch_size, max_chars=max_chars, advance=advance)
    pairs = {name: (features[name], labels) for name, labels in zip(splits, encoded)}
    probe = fit_probe(pairs["train"], pairs["val"], pairs["test"])
    if plot is not None:
        plot_unit_histogram(features["test"][:, probe.top_unit], encoded[2], names, probe.top_unit, plot)
    return TransferReport(
        probe=probe,
        labels=(names[0], names[1]),
        counts={name: len(data.texts) for name, data in splits.items()},
        hidden_size=model.hidden_size,
        plot=plot,
    )
