"""W&B Artifacts: what a run produced, and which runs' files it started from.

**Outputs.** At its end every run that logs to W&B logs its files as versioned artifacts
(:func:`log_run_artifacts`):

- ``model-<cell>-seed<seed>`` (type ``model``): ``checkpoints/last.ckpt`` and ``best.ckpt``
- ``masks-<cell>-seed<seed>`` (type ``masks``): ``checkpoints/masks.pt``, the engine's final
  masks (``{name: bool tensor}``), written when the run logs artifacts
- ``results-<cell>-seed<seed>`` (type ``results``): ``results.json``
- ``rewind-<IMP cell>-seed<seed>`` (type ``model``): ``rewind.pt``, logged by IMP level 0

``<cell>`` is the record's ``config_hash`` (an IMP level's own hash), so every cell and seed
is one artifact collection whose versions accumulate as it is run again; W&B matches content
by digest, so logging identical files again adds no version. ``logger.wandb.artifacts=false``
turns all of it off.

**Inputs.** A run that starts from another run's files declares them (:func:`use_input`): the
artifact is built from the same files under the same name as its producer logged it, so W&B
matches it by digest to the producer's version and records the lineage edge; files never
logged before become a new version with no producing run. ``train`` declares the checkpoint a
run resumes or fine-tunes from (``ckpt_path``); an IMP level declares the rewind weights and
the previous level's model and masks.

**Offline.** An offline run keeps a copy of each artifact file in its own W&B folder
(``wandb/offline-run-*/artifacts/<md5 of the file>``; its transaction log maps the artifact's
file names to them) and ``wandb sync`` (``make wandb-sync``) uploads them: keep the offline
runs of a run folder until they are synced. W&B refuses ``use_artifact`` offline, so an
offline input is written as the record the online call sends (an artifact marked *use after
commit*): on sync W&B creates or matches the version and marks it used by the run. An input
whose producer already keeps an identical copy points at that copy instead of a new one.
:func:`offline_artifacts` reads back what an offline run will upload.

Nothing here fails a run: each call catches everything and logs one warning line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab import files
from prunelab.tracking.results import read_record

log = logging.getLogger(__name__)

# Artifact kind -> W&B artifact type.
TYPES = {"model": "model", "masks": "masks", "results": "results", "rewind": "model"}
# The kinds a run folder holds, in the order a run logs them.
RUN_KINDS = ("model", "masks", "results")
# Attribute of the Lightning WandbLogger that carries logger.wandb.artifacts.
ENABLED_ATTR = "prunelab_artifacts"
# Inside an offline run's W&B folder: the files its artifacts upload on sync.
OFFLINE_FILES_DIR = "artifacts"


@dataclass(frozen=True)
class Ref:
    """One artifact by its files: ``path`` is a run folder (its files of ``kind``, see
    :func:`run_files`) or one file; ``name`` defaults to the one derived from the record of
    the run folder that holds it; ``producer`` is the run folder that logged it, when that is
    not the folder that holds it (IMP's rewind weights, logged by level 0)."""

    path: Path
    kind: str
    name: str | None = None
    producer: Path | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


def artifact_name(kind: str, cell: str, seed: int | str) -> str:
    """The artifact collection of ``kind`` for one cell and seed: ``model-<cell>-seed<seed>``."""
    return _clean(f"{kind}-{cell}-seed{seed}")


def run_files(run_dir: str | Path, kind: str) -> dict[str, Path]:
    """The files of ``kind`` a run folder holds now, by their name inside the artifact."""
    run_dir = Path(run_dir)
    if kind == "model":
        ckpts = files.checkpoint_dir(run_dir)
        paths = [ckpts / files.LAST_CHECKPOINT, ckpts / files.BEST_CHECKPOINT]
    elif kind == "masks":
        paths = [files.masks_path(run_dir)]
    elif kind == "results":
        paths = [files.results_path(run_dir)]
    else:
        raise ValueError(f"a run folder holds no files of kind {kind!r}; kinds: {RUN_KINDS}")
    return {p.name: p for p in paths if p.is_file()}


def write_masks(run_dir: str | Path, masks: Any) -> Path:
    """Write ``masks`` (a :class:`~prunelab.sparsity.masks.Masks` or ``{name: bool tensor}``)
    atomically to the run's masks file; read back with ``Masks.from_state_dict(torch.load)``."""
    import torch

    state = masks.state_dict() if hasattr(masks, "state_dict") else dict(masks)
    state = {name: mask.detach().to("cpu", torch.bool) for name, mask in state.items()}
    path = files.masks_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def enabled(wandb_logger: Any) -> bool:
    """Whether ``wandb_logger`` (a Lightning WandbLogger or a W&B run) logs artifacts: there
    is one and ``logger.wandb.artifacts`` is not false."""
    return wandb_logger is not None and bool(getattr(wandb_logger, ENABLED_ATTR, True))


def checkpoint_ref(ckpt_path: str | Path) -> Ref:
    """The artifact a checkpoint belongs to: its run's ``model`` artifact when it is one of
    the checkpoints of a run folder with a record, else the file alone."""
    path = Path(ckpt_path)
    run_dir = path.parent.parent
    if (
        path.parent.name == files.CHECKPOINT_DIR
        and path.name in run_files(run_dir, "model")
        and (read_record(run_dir) or {}).get("config_hash")
    ):
        return Ref(run_dir, "model")
    return Ref(path, "model")


def log_output(
    wandb_logger: Any,
    path: str | Path,
    kind: str,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    aliases: Iterable[str] = (),
) -> str | None:
    """Log the files at ``path`` (a run folder's files of ``kind``, or one file) as an
    output artifact of the run; return its name, or None when nothing was logged (artifacts
    off, no files, or a failure: one warning line)."""
    ref = Ref(Path(path), kind, name, metadata=dict(metadata or {}))
    return _guarded("log", wandb_logger, ref, lambda run: _log(run, ref, list(aliases)))


def use_input(
    wandb_logger: Any,
    path: str | Path,
    kind: str,
    name: str | None = None,
    producer: str | Path | None = None,
) -> str | None:
    """Declare the files at ``path`` (as for :func:`log_output`) an input of the run; return
    the artifact's name, or None when nothing was declared (one warning line on failure)."""
    ref = Ref(Path(path), kind, name, Path(producer) if producer is not None else None)
    return _guarded("use", wandb_logger, ref, lambda run: _use(run, ref))


def use_inputs(wandb_logger: Any, refs: Iterable[Ref]) -> list[str]:
    """:func:`use_input` for each of ``refs``; the names declared."""
    names = []
    for ref in refs:
        used = _guarded("use", wandb_logger, ref, lambda run, r=ref: _use(run, r))
        if used is not None:
            names.append(used)
    return names


def log_run_artifacts(
    wandb_logger: Any,
    run_dir: str | Path,
    record: Mapping[str, Any],
    masks: Any = None,
    extra: Iterable[Ref] = (),
) -> list[str]:
    """At the end of a run: write ``masks`` (the engine's) to the run's masks file, then log
    the run's model, masks and results and each of ``extra`` as output artifacts named after
    the record's cell and seed; return the names logged."""
    if not enabled(wandb_logger):
        return []
    run_dir = Path(run_dir)
    if masks is not None:
        try:
            write_masks(run_dir, masks)
        except Exception as err:
            log.warning("W&B artifacts: could not write the masks file: %s", _first_line(err))
    cell, seed = record.get("config_hash") or "run", record.get("seed", 0)
    about = _metadata(record)
    names = []
    for kind in RUN_KINDS:
        ref = Ref(run_dir, kind, artifact_name(kind, cell, seed), metadata=about)
        logged = _guarded("log", wandb_logger, ref, lambda run, r=ref: _log(run, r, []))
        if logged is not None:
            names.append(logged)
    for ref in extra:
        ref = Ref(ref.path, ref.kind, ref.name, ref.producer, {**about, **ref.metadata})
        logged = _guarded("log", wandb_logger, ref, lambda run, r=ref: _log(run, r, []))
        if logged is not None:
            names.append(logged)
    return names


def offline_records(path: str | Path) -> Iterator[Any]:
    """The records (``wandb_internal_pb2.Record``) of an offline W&B run's transaction log,
    in order (``path``: the ``.wandb`` file or the ``offline-run-*`` folder). W&B may still be
    writing it shortly after ``finish()`` returns: the last record of a finished run is its
    ``exit``."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    for log_file in sorted(path.glob("*.wandb")) if path.is_dir() else [path]:
        for raw in _log_records(log_file.read_bytes()):
            record = pb.Record()
            record.ParseFromString(raw)
            yield record


def offline_artifacts(path: str | Path) -> list[dict[str, Any]]:
    """The artifacts an offline W&B run holds, in the order it logged them, read from its
    transaction log (``path`` as for :func:`offline_records`): name, type, digest, ``used``
    (declared as an input), aliases, metadata and each file (digest, size, local path: what
    ``wandb sync`` uploads)."""
    import json

    found = []
    for record in offline_records(path):
        if record.WhichOneof("record_type") != "artifact":
            continue
        art = record.artifact
        found.append(
            {
                "name": art.name,
                "type": art.type,
                "digest": art.digest,
                "used": bool(art.use_after_commit),
                "aliases": list(art.aliases),
                "metadata": json.loads(art.metadata) if art.metadata else {},
                "files": {
                    e.path: {"digest": e.digest, "size": e.size, "local_path": e.local_path}
                    for e in art.manifest.contents
                },
            }
        )
    return found


def offline_run_dirs(run_dir: str | Path) -> list[Path]:
    """The offline W&B runs a run folder holds (``wandb/offline-run-*``), oldest first."""
    return sorted((Path(run_dir) / files.WANDB_DIR).glob("offline-run-*"), key=lambda p: p.name)


# ---------------------------------------------------------------------------------------


def _guarded(action: str, wandb_logger: Any, ref: Ref, call: Any) -> str | None:
    """Run ``call(run)`` unless artifacts are off; any failure is one warning line."""
    if not enabled(wandb_logger):
        return None
    try:
        run = getattr(wandb_logger, "experiment", wandb_logger)
        return call(run)
    except Exception as err:
        what = ref.name or f"{ref.kind} of {ref.path}"
        verb = "log" if action == "log" else "declare the input"
        log.warning("W&B artifacts: could not %s %s: %s", verb, what, _first_line(err))
        return None


def _log(run: Any, ref: Ref, aliases: list[str]) -> str | None:
    built = _build(run, ref, reuse=False)
    if built is None:
        return None
    artifact, name = built
    run.log_artifact(artifact, aliases=aliases or None)
    return name


def _use(run: Any, ref: Ref) -> str | None:
    built = _build(run, ref, reuse=True)
    if built is None:
        return None
    artifact, name = built
    if _offline(run):
        # use_artifact refuses offline runs; this is the record it sends for a new artifact
        # (created or matched by digest on sync, then marked as used by this run).
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)
    return name


def _build(run: Any, ref: Ref, reuse: bool) -> tuple[Any, str] | None:
    """The W&B artifact of ``ref`` and its name, or None when its files are missing. Offline,
    an input (``reuse``) may point at its producer's copy of a file; an output always gets
    its own copy."""
    import wandb

    path = Path(ref.path)
    entries = run_files(path, ref.kind) if path.is_dir() else {}
    if path.is_file():
        entries = {path.name: path}
    if not entries:
        log.debug("W&B artifacts: no %s files at %s", ref.kind, path)
        return None
    name = ref.name or _default_name(path, ref.kind, entries)
    kind_type = TYPES.get(ref.kind, ref.kind)
    artifact = wandb.Artifact(name, type=kind_type, metadata=dict(ref.metadata))
    offline = _offline(run)
    producer = ref.producer or (path if path.is_dir() else path.parent)
    for entry, source in entries.items():
        if offline:
            local = _offline_copy(run, source, producer if reuse else None)
            artifact.add_file(str(local), name=entry, policy="immutable")
        else:  # W&B copies the file until it is uploaded
            artifact.add_file(str(source), name=entry)
    return artifact, name


def _default_name(path: Path, kind: str, entries: Mapping[str, Path]) -> str:
    """The producer's name: from the record of the run folder holding ``path``, else (a file
    outside any run) from the file's content."""
    run_dir = path if path.is_dir() else path.parent
    record = read_record(run_dir) or {}
    if record.get("config_hash"):
        return artifact_name(kind, record["config_hash"], record.get("seed", 0))
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(entry.encode())
        digest.update(_md5(entries[entry]).encode())
    return _clean(f"{kind}-file-{digest.hexdigest()[:12]}")


def _offline(run: Any) -> bool:
    return bool(getattr(run, "offline", False))


def _offline_copy(run: Any, source: Path, producer: Path | None) -> Path:
    """The file an offline run's artifact entry points at, named by its content's MD5: the
    copy that an offline run of ``producer`` (or this run) already keeps, else a new copy in
    this run's W&B folder (sync reads it later, and the source may change before then). A
    content name also keeps copies of ``results.json`` or ``*.ckpt`` out of searches for a
    run's own files."""
    digest = _md5(source)
    folders = offline_run_dirs(producer) if producer is not None else []
    for offline_dir in reversed(folders):
        kept = offline_dir / OFFLINE_FILES_DIR / digest
        if kept.is_file():
            return kept
    target = Path(run.dir).parent / OFFLINE_FILES_DIR / digest
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{digest}.{os.getpid()}.tmp")
        try:
            shutil.copy2(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """What an artifact says about the run that made it (a small, flat summary)."""
    code = record.get("code") or {}
    sparsity = record.get("sparsity") or {}
    metrics = record.get("metrics") or {}
    about = {
        "run_dir": record.get("run_dir"),
        "config_hash": record.get("config_hash"),
        "seed": record.get("seed"),
        "status": record.get("status"),
        "code_commit": code.get("commit"),
        "code_dirty": code.get("dirty"),
        "sparsity": sparsity.get("global"),
        "global_step": record.get("global_step"),
        **{k: metrics[k] for k in ("test/acc", "val/acc", "val/acc_best") if k in metrics},
    }
    imp = record.get("imp") or {}
    if imp:
        about.update({f"imp_{k}": imp.get(k) for k in ("level", "branch", "parent_hash")})
    return {k: v for k, v in about.items() if v is not None}


def _clean(name: str) -> str:
    """A valid W&B artifact name: letters, digits, ``-``, ``_`` and ``.``; at most 128."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:128]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# The transaction log (``run-<id>.wandb``): a 7-byte file header (":W&B", magic 0xBEE1,
# version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32, length, type:
# 1 full, 2 first, 3 middle, 4 last); a block ends with zero padding when fewer than 7 bytes
# are left. Each whole record is a serialised ``wandb_internal_pb2.Record``.
_BLOCK = 32 * 1024
_HEADER = struct.Struct("<IHB")


def _log_records(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = 7, b""
    while pos + _HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER.size:
            pos += left
            continue
        _, length, kind = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        chunk, pos = data[pos : pos + length], pos + length
        if len(chunk) < length:  # the log of a run still running, or cut short
            return
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""
