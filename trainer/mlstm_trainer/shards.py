"""The prepared-dataset format: byte shards plus a `manifest.json` written last.

A shard is documents concatenated, each as its UTF-8 bytes followed by one separator byte
(`corpus.DOC_SEPARATOR`), so a document starts at a shard's first byte or right after a separator.
The manifest lists every shard with its split, object name, byte length, document count and
sha256. Because it is written after all shards, a dataset without a manifest is unfinished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .corpus import DOC_SEPARATOR
from .storage import ObjectNotFound, ObjectStore

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A dataset's manifest is missing or not one this trainer can read."""


@dataclass(frozen=True, slots=True)
class ShardInfo:
    name: str
    """Object name relative to the dataset root, e.g. `shard-000003.bin`."""
    split: str
    bytes: int
    documents: int
    sha256: str


@dataclass(frozen=True, slots=True)
class DatasetManifest:
    shards: tuple[ShardInfo, ...]
    version: int = FORMAT_VERSION
    separator: int = DOC_SEPARATOR
    seed: int = 0

    def split(self, split: str) -> tuple[ShardInfo, ...]:
        """The shards of one split, in manifest order (the order streams concatenate them)."""
        return tuple(s for s in self.shards if s.split == split)

    def to_json(self) -> str:
        body = {"format_version": self.version, "separator": self.separator, "seed": self.seed,
                "shards": [asdict(s) for s in self.shards]}
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "DatasetManifest":
        try:
            body: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where} is not valid JSON ({err.msg}); re-run `mlstm data prepare`") from None
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where} has format_version {version!r}, this trainer reads {FORMAT_VERSION}; "
                "re-run `mlstm data prepare` with this version"
            )
        try:
            shards = tuple(ShardInfo(**s) for s in body["shards"])
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{where} has a malformed shard list ({err}); re-run `mlstm data prepare`") from None
        unknown = sorted({s.split for s in shards} - set(SPLITS))
        if unknown:
            raise ManifestError(f"{where} names unknown split {unknown[0]!r}; splits are {', '.join(SPLITS)}")
        return cls(shards=shards, version=version, separator=body.get("separator", DOC_SEPARATOR), seed=body.get("seed", 0))


def read_manifest(store: ObjectStore) -> DatasetManifest:
    """Load and check the manifest of the dataset at `store`'s root."""
    where = store.url(MANIFEST_NAME)
    try:
        text = store.get(MANIFEST_NAME).decode("utf-8")
    except ObjectNotFound:
        raise ManifestError(
            f"{where} not found: not a prepared dataset (or its prepare did not finish); run `mlstm data prepare ... --out {store.url()}`"
        ) from None
    return DatasetManifest.from_json(text, where)


def has_manifest(store: ObjectStore) -> bool:
    return store.size(MANIFEST_NAME) is not None
