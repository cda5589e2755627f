"""Subject covariates (age, sex, ...) from a participants TSV, encoded as model inputs.

A table is a tab-separated file with a header: a subject column (``participant_id`` as in
BIDS ``participants.tsv``, else ``subject``, else the first column) and covariate
columns. A subject (a prepared folder's or scan's id such as ``sub-01_ses-2``) takes the
row whose id equals it, or is its first ``_``-separated part (``sub-01``); ids without the
BIDS ``sub-`` prefix also match ``sub-<id>``.

:class:`CovariateEncoding` turns a row into a float vector: a numeric column is
standardised with the training subjects' mean and SD (``age -> (age - mean) / sd``), a text
column is one-hot over the categories seen in training (``sex -> sex=F, sex=M``). The
encoding is fitted on the training subjects and stored in the checkpoint's metadata
(:meth:`CovariateEncoding.to_dict`), so scoring encodes a subject exactly as training did.
Missing values (empty, ``n/a``) and unseen categories are one-line errors naming the file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uadct.errors import InputError, UadctError

SUBJECT_COLUMNS = ("participant_id", "subject", "subject_id")
DEFAULT_COLUMNS = ("age", "sex")
MISSING = ("", "n/a", "na", "nan")
METADATA_KEY = "covariates"  # checkpoint metadata: CovariateEncoding.to_dict()


@dataclass
class CovariateTable:
    """The rows of a participants TSV: ``{subject id: {column: text}}``."""

    path: Path
    rows: dict[str, dict[str, str]]
    columns: list[str]

    @classmethod
    def read(cls, path: str | Path) -> "CovariateTable":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: covariate table not found")
        try:
            with open(path, encoding="utf-8", newline="") as handle:
                reader = csv.reader(handle, delimiter="\t")
                header = next(reader, None)
                body = [row for row in reader if any(cell.strip() for cell in row)]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{path}: not a readable TSV ({exc})") from None
        if not header or len(header) < 2:
            raise InputError(f"{path}: a covariate table needs a header with a subject column and at least one covariate (tab-separated)")
        header = [h.strip() for h in header]
        subject = next((c for c in SUBJECT_COLUMNS if c in header), header[0])
        rows: dict[str, dict[str, str]] = {}
        for number, row in enumerate(body, start=2):
            if len(row) != len(header):
                raise InputError(f"{path}: line {number} has {len(row)} fields, the header {len(header)}")
            values = {name: cell.strip() for name, cell in zip(header, row)}
            key = values.pop(subject)
            if key in rows:
                raise InputError(f"{path}: subject {key!r} appears twice")
            rows[key] = values
        return cls(path, rows, [h for h in header if h != subject])

    def row(self, subject: str) -> dict[str, str]:
        """The row of ``subject`` (see the module docstring for how ids match); a one-line error if none."""
        first = subject.split("_")[0]
        for key in (subject, first):
            for candidate in (key, key.removeprefix("sub-")):
                if candidate in self.rows:
                    return self.rows[candidate]
        raise InputError(f"{self.path}: no row for subject {subject!r}")


@dataclass
class CovariateEncoding:
    """How covariate columns become model inputs (fitted on the training subjects)."""

    columns: list[str]
    means: dict[str, float] = field(default_factory=dict)  # numeric columns
    sds: dict[str, float] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)  # text columns, one-hot

    @property
    def names(self) -> list[str]:
        """Feature names in vector order: ``age``, ``sex=F``, ``sex=M``, ..."""
        names: list[str] = []
        for column in self.columns:
            names += [f"{column}={c}" for c in self.categories[column]] if column in self.categories else [column]
        return names

    @property
    def size(self) -> int:
        return len(self.names)

    @classmethod
    def fit(cls, table: CovariateTable, subjects: list[str], columns: list[str] | None = None) -> "CovariateEncoding":
        """Means/SDs and categories from the training ``subjects``' rows (each must have one)."""
        chosen = list(columns) if columns else [c for c in DEFAULT_COLUMNS if c in table.columns]
        if not chosen:
            raise InputError(f"{table.path}: no covariate columns: none of {', '.join(DEFAULT_COLUMNS)} in the header; "
                             f"name the columns to use (found: {', '.join(table.columns)})")
        unknown = [c for c in chosen if c not in table.columns]
        if unknown:
            raise InputError(f"{table.path}: no column {unknown[0]!r}; columns: {', '.join(table.columns)}")
        rows = {s: table.row(s) for s in subjects}
        encoding = cls(chosen)
        for column in chosen:
            values = [_present(table.path, s, column, row[column]) for s, row in rows.items()]
            numbers = [_number(v) for v in values]
            if all(n is not None for n in numbers):
                array = np.asarray(numbers, dtype=np.float64)
                encoding.means[column] = float(array.mean())
                sd = float(array.std())
                encoding.sds[column] = sd if sd > 0 else 1.0
            else:
                encoding.categories[column] = sorted({v.upper() if column == "sex" else v for v in values})
        return encoding

    def encode_row(self, row: dict[str, str], subject: str, source: str | Path) -> np.ndarray:
        """One subject's vector ``(size,)`` float32 from its row's text values."""
        vector: list[float] = []
        for column in self.columns:
            if column not in row:
                raise InputError(f"{source}: no column {column!r} (the model was trained with {', '.join(self.columns)})")
            text = _present(source, subject, column, row[column])
            if column in self.categories:
                value = text.upper() if column == "sex" else text
                if value not in self.categories[column]:
                    raise InputError(f"{source}: subject {subject!r} has {column}={text!r}, a value not seen in training "
                                     f"({', '.join(self.categories[column])})")
                vector += [1.0 if value == c else 0.0 for c in self.categories[column]]
            else:
                number = _number(text)
                if number is None:
                    raise InputError(f"{source}: subject {subject!r} has {column}={text!r}, not a number")
                vector.append((number - self.means[column]) / self.sds[column])
        return np.asarray(vector, dtype=np.float32)

    def for_subject(self, table: CovariateTable, subject: str) -> np.ndarray:
        return self.encode_row(table.row(subject), subject, table.path)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "means": self.means, "sds": self.sds, "categories": self.categories, "names": self.names}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CovariateEncoding":
        try:
            return cls(list(data["columns"]), dict(data.get("means", {})), dict(data.get("sds", {})),
                       {k: list(v) for k, v in data.get("categories", {}).items()})
        except (KeyError, TypeError, AttributeError):
            raise UadctError("checkpoint covariate metadata is damaged (expected columns, means, sds, categories)") from None


def _present(source: str | Path, subject: str, column: str, text: str) -> str:
    if text.strip().lower() in MISSING:
        raise InputError(f"{source}: subject {subject!r} has no value for {column!r}")
    return text.strip()


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass
class CovariateSource:
    """Where scoring gets a subject's covariates: a table, or one set of values for every subject (``--age/--sex``)."""

    encoding: CovariateEncoding
    table: CovariateTable | None = None
    values: dict[str, str] | None = None

    def vector(self, subject: str) -> np.ndarray:
        if self.table is not None:
            return self.encoding.for_subject(self.table, subject)
        return self.encoding.encode_row(self.values or {}, subject, "--age/--sex")


def encoding_of(metadata: dict[str, Any]) -> CovariateEncoding | None:
    """The covariate encoding a checkpoint was trained with (None: not conditioned on covariates)."""
    data = metadata.get(METADATA_KEY)
    return CovariateEncoding.from_dict(data) if data else None


def attach_training_covariates(path: str | Path, columns: tuple[str, ...] | list[str], train_volumes: list[Any],
                               val_volumes: list[Any]) -> CovariateEncoding:
    """Fit the encoding on the training subjects of ``path`` and set every volume's ``covariates``
    (a training or validation subject without a row is a one-line error)."""
    table = CovariateTable.read(path)
    encoding = CovariateEncoding.fit(table, [v.subject for v in train_volumes], list(columns) or None)
    for volume in [*train_volumes, *val_volumes]:
        volume.covariates = encoding.for_subject(table, volume.subject)
    return encoding


def covariate_model_option(model: str, scorer: str, encoding: CovariateEncoding) -> dict[str, int]:
    """``{"covariates": K}`` for the network, unless only the forest scorer takes them (a model that cannot)."""
    from uadct.models import model_class

    if scorer == "forest" and not model_class(model).supports_covariates:
        return {}
    return {"covariates": encoding.size}


def scoring_source(metadata: dict[str, Any], table: str | Path | None = None, age: float | None = None,
                   sex: str | None = None) -> CovariateSource | None:
    """The covariates `uadct score` gives a checkpoint: from ``table`` or from ``age``/``sex``;
    one-line errors when a conditioned model gets none, or an unconditioned one gets some."""
    encoding = encoding_of(metadata)
    given = table is not None or age is not None or sex is not None
    if encoding is None:
        if given:
            raise InputError("the model was not trained with covariates; leave out --covariates, --age and --sex")
        return None
    if table is not None and (age is not None or sex is not None):
        raise InputError("give either --covariates or --age/--sex, not both")
    if table is not None:
        return CovariateSource(encoding, CovariateTable.read(table))
    if not given:
        raise InputError(f"the model is conditioned on subject covariates ({', '.join(encoding.columns)}); "
                         "give --covariates participants.tsv or --age/--sex")
    values = {k: str(v) for k, v in (("age", age), ("sex", sex)) if v is not None}
    missing = [c for c in encoding.columns if c not in values]
    if missing:
        raise InputError(f"the model is conditioned on {', '.join(encoding.columns)}; --age/--sex cannot give "
                         f"{', '.join(missing)}: use --covariates with a table")
    return CovariateSource(encoding, values=values)


def calibration_source(metadata: dict[str, Any], table: str | Path | None, checkpoint: str | Path) -> CovariateSource | None:
    """The covariates `uadct calibrate` gives a checkpoint: each healthy subject's row of ``table``;
    one-line errors naming ``checkpoint`` when a conditioned model gets no table, or another model gets one."""
    encoding = encoding_of(metadata)
    if encoding is None:
        if table is not None:
            raise InputError(f"{checkpoint}: the model was not trained with covariates; leave out --covariates")
        return None
    if table is None:
        raise InputError(f"{checkpoint}: the model is conditioned on subject covariates ({', '.join(encoding.columns)}); "
                         "give --covariates participants.tsv with a row for every calibration subject")
    return CovariateSource(encoding, CovariateTable.read(table))


def training_source(path: str | Path, encoding: CovariateEncoding) -> CovariateSource:
    """The covariates of a training run's subjects (its participants TSV, its fitted encoding), for the healthy calibration."""
    return CovariateSource(encoding, CovariateTable.read(path))
