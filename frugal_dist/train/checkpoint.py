"""Training checkpoints: atomic, checksummed, resumable, reshardable where the engine allows.

Layout of ``<output_dir>/checkpoints/step_XXXXXXXX/``:

* ``manifest.json`` -- written last: step, world size, engine, config fingerprint, package
  versions and the sha256 + size of every other file. A directory without a valid manifest, or
  whose files do not match it, is not a checkpoint.
* ``trainer.pt`` -- step, tokens, every rank's RNG state, the data position
  (``train_data.state_dict()`` when the data object has one), last validation loss.
* the engine's state:

  - single / ddp: ``model.pt`` (``model.state_dict()``) and ``optim.pt``
    (``optimizer.state_dict()``; replicated). FRUGAL with ``shard_state`` holds different state on
    each rank: ``optim_rank{r}.pt`` per rank. Either resumes under single or ddp at any world
    size (per-rank files are merged on load; see ``checkpoint_engines``).
  - fsdp2: ``dcp/`` -- torch.distributed.checkpoint, one shard per rank plus metadata, loaded at
    any world size (``frugal_dist.engines.fsdp2_checkpoint``).
  - deepspeed: ``deepspeed.pt`` -- the fp32 master weights gathered to full tensors and the
    optimizer state in the consolidated name-keyed format of ``frugal_dist.optim.consolidate``;
    resumes at any world size and ZeRO stage.
  - fsdp1: ``fsdp1.pt`` -- full model state dict + consolidated FRUGAL state (any world size).
  - fairscale: not supported yet (saving is skipped with a note, ``--resume`` is refused).

Protocol (every rank calls ``save``): rank 0 makes ``.tmp_step_XXXXXXXX``; every rank writes its
part; barrier; rank 0 hashes the files, writes the manifest, renames the directory to its final
name (``os.replace``; atomic on one file system) and prunes all but the newest
``keep_checkpoints``. A crash at any point leaves either the previous checkpoints or a ``.tmp_``
directory, which ``find_latest`` ignores. The output directory must be one file system shared by
the ranks (one host, or a shared mount).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from frugal_dist.train.config import TrainConfig
from frugal_dist.train.logs import logger
from frugal_dist.train.resume_policy import compare, fingerprint

FORMAT = "frugal_dist.checkpoint/1"
STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp_"
_NOTED: list[str] = []  # engines already told they have no checkpoints
# Engines whose checkpoints hold replicated (world-size-free) state: each resumes the other's.
REPLICATED = ("single", "ddp")


# ----------------------------------------------------------------------------- identity
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_compatible(
    manifest: dict[str, Any], cfg: TrainConfig, engine: str, path: Path
) -> list[str]:
    """Raise ``ValueError`` naming every differing field if ``manifest`` is of another run, or
    if a setting differs that ``cfg.resume_override`` does not name (``resume_policy``); returns
    the notices of the overridden settings (``"optimizer.lr 0.003 -> 0.001"``)."""
    refusals, notices = compare(manifest["config"], cfg, cfg.resume_override)
    if refusals:
        raise ValueError(f"checkpoint {path}: {' '.join(refusals)}")
    if manifest["engine"] != engine and not {manifest["engine"], engine} <= set(REPLICATED):
        fix = f"--engine={manifest['engine']}"
        if manifest["engine"] in REPLICATED:  # replicated state: either engine, any world size
            fix = "--engine=ddp (torchrun, any number of ranks) or --engine=single (one process)"
        raise ValueError(
            f"checkpoint {path} was written by engine={manifest['engine']!r}, this run uses "
            f"engine={engine!r}; resume with {fix}"
        )
    if cfg.max_steps < manifest["step"]:
        raise ValueError(
            f"max_steps={cfg.max_steps} is below the step of checkpoint {path} "
            f"({manifest['step']}); resume with --max_steps={manifest['step']} or more"
        )
    return notices


# ----------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` for a complete checkpoint whose files match their checksums, else
    ``(None, reason)``."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        return None, "not a directory"
    if not mpath.is_file():
        return None, "no manifest.json (incomplete: the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        return None, f"manifest.json unreadable ({exc})"
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return None, f"manifest.json is not a {FORMAT} manifest"
    for rel, info in sorted(manifest["files"].items()):
        f = path / rel
        if not f.is_file():
            return None, f"file {rel} is missing"
        size = f.stat().st_size
        if size != info["bytes"]:
            return None, f"file {rel} has {size} bytes, manifest says {info['bytes']} (truncated?)"
        if sha256_file(f) != info["sha256"]:
            return None, f"file {rel} fails its sha256 check (corrupted)"
    return manifest, None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_XXXXXXXX`` directory under ``root``, newest first
    (temporary ``.tmp_`` directories are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def find_latest(root: str | Path, report: Any = logger.warning) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; each one skipped is reported."""
    for _, path in list_checkpoints(root):
        manifest, reason = verify(path)
        if manifest is not None:
            return path
        report(f"skipping checkpoint {path}: {reason}")
    return None


# ----------------------------------------------------------------------------- collectives
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- save
@dataclasses.dataclass
class TrainState:
    """What the loop needs besides model and optimizer to continue exactly."""

    step: int  # optimizer steps done
    tokens: int
    val_loss: float
    data_state: Any = None  # this rank's ``train_data.state_dict()`` (None: position is the step)


def save(
    root: str | Path,
    state: TrainState,
    *,
    cfg: TrainConfig,
    engine: str,
    model: torch.nn.Module,
    optimizer: Any,
    ds_engine: Any = None,
) -> Path:
    """Write checkpoint ``root/step_XXXXXXXX`` (collective; see module doc). Returns its path."""
    from frugal_dist import __version__

    rank, world = _world()
    root = Path(root)
    final = root / f"step_{state.step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    from frugal_dist.train import checkpoint_engines as ce

    ce.save_engine_state(tmp, engine, model, optimizer, ds_engine, rank, world)
    rngs = _gather(ce.rng_state())
    data_states = _gather(state.data_state)
    if rank == 0:
        torch.save({"step": state.step, "tokens": state.tokens, "val_loss": state.val_loss,
                    "rng": rngs, "data": data_states}, tmp / "trainer.pt")  # fmt: skip
    _barrier()
    if rank == 0:
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(f)
            files[f.relative_to(tmp).as_posix()] = {"sha256": sha256_file(f),
                                                    "bytes": f.stat().st_size}  # fmt: skip
        fp = fingerprint(cfg)
        manifest = {"format": FORMAT, "step": state.step, "tokens": state.tokens,
                    "world_size": world, "engine": engine, "fingerprint": fp,
                    "fingerprint_sha256": _digest(fp), "config": dataclasses.asdict(cfg),
                    "frugal_dist_version": __version__, "torch_version": torch.__version__,
                    "files": files}  # fmt: skip
        part = tmp / "manifest.json.part"
        part.write_text(json.dumps(manifest, indent=1, default=str))
        _fsync(part)
        os.replace(part, tmp / "manifest.json")
        if final.exists():  # the same step saved again (a rerun without --resume)
            old = root / f"{TMP_PREFIX}old_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync(root)
        prune(root, cfg.keep_checkpoints, keep_tmp=())
    _barrier()
    return final


def prune(root: Path, keep: int, keep_tmp: tuple[str, ...] = ()) -> None:
    """Delete all but the ``keep`` newest checkpoints (0 keeps all) and stale ``.tmp_`` dirs."""
    if keep > 0:
        for _, path in list_checkpoints(root)[keep:]:
            shutil.rmtree(path, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.name not in keep_tmp and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- resume
def resolve_resume(cfg: TrainConfig, engine: str) -> Path | None:
    """The checkpoint this run resumes from (collective; rank 0 decides and verifies):
    ``resume=None`` -> None; ``"auto"`` -> newest valid checkpoint of ``output_dir`` or None;
    a path -> that checkpoint (``ValueError`` if it does not verify). Raises ``ValueError`` on
    every rank for a checkpoint of another run."""
    if cfg.resume is None:
        return None
    rank, _ = _world()
    answer: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        try:
            answer = (_choose(cfg, engine), None)
        except ValueError as exc:
            answer = (None, str(exc))
    path, error = _broadcast(answer)
    if error is not None:
        raise ValueError(error)
    return Path(path) if path is not None else None


def _choose(cfg: TrainConfig, engine: str) -> str | None:
    if cfg.resume == "auto":
        if cfg.output_dir is None:
            raise ValueError(
                "resume='auto' needs output_dir (where the checkpoints are): add "
                "--output_dir=<the run's directory>, or give --resume=<checkpoint>"
            )
        path = find_latest(Path(cfg.output_dir) / "checkpoints")
        if path is None:
            logger.info("resume=auto: no complete checkpoint; starting from step 0")
            return None
    else:
        path = Path(cfg.resume)
        if STEP_DIR.match(path.name) is None and (path / "checkpoints").is_dir():
            path = find_latest(path / "checkpoints")  # a run directory: its newest checkpoint
            if path is None:
                raise ValueError(
                    f"resume={cfg.resume!r}: no valid checkpoint in that run "
                    "(see the skipped ones above); give one checkpoint directory "
                    "(.../checkpoints/step_XXXXXXXX), or drop --resume"
                )
    manifest, reason = verify(path)
    if manifest is None:
        raise ValueError(
            f"resume={str(path)!r} is not a valid checkpoint: {reason}; give "
            "another one (an older step_XXXXXXXX of the run, or --resume=auto for "
            "the newest valid one in output_dir)"
        )
    notices = check_compatible(manifest, cfg, engine, path)
    logger.info(f"resuming from {path} (step {manifest['step']}, written by "
                f"{manifest['world_size']} rank(s))")  # fmt: skip
    if notices:
        logger.info(f"resume_override: this run's values replace the checkpoint's from step "
                    f"{manifest['step'] + 1}: {'; '.join(notices)}")  # fmt: skip
    return str(path)


def load(
    path: str | Path,
    *,
    engine: str,
    model: torch.nn.Module,
    optimizer: Any,
    ds_engine: Any = None,
) -> TrainState:
    """Restore model, optimizer and RNG from checkpoint ``path`` (every rank; collective for
    fsdp2 / deepspeed). Returns the step, tokens, last validation loss and this rank's data
    state (None when the data position is the step alone)."""
    from frugal_dist.train import checkpoint_engines as ce

    path = Path(path)
    rank, world = _world()
    manifest = json.loads((path / "manifest.json").read_text())
    ce.load_engine_state(path, engine, model, optimizer, ds_engine, manifest["world_size"],
                         rank, world)  # fmt: skip
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    same_world = len(trainer["rng"]) == world
    ce.set_rng_state(trainer["rng"][rank if same_world else 0])
    data = trainer["data"][rank if same_world else 0]
    _barrier()
    return TrainState(trainer["step"], trainer["tokens"], trainer["val_loss"], data)


# ----------------------------------------------------------------------------- loop helpers
def _engine_model(engine: str, model: torch.nn.Module, wrapped: Any) -> Any:
    return wrapped if engine == "fsdp1" and wrapped is not None else model


def resume_into(
    cfg: TrainConfig,
    engine: str,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    ds_engine: Any = None,
    train_data: Any = None,
    wrapped: Any = None,
) -> TrainState:
    """What the loop starts from: step 0, or the state of the checkpoint ``cfg.resume`` names
    (model, optimizer, RNG and -- if the data object has ``load_state_dict`` -- data position
    restored). Collective. ``wrapped``: the engine's wrapper of ``model`` (fsdp1 saves through
    it)."""
    from frugal_dist.train.checkpoint_engines import SUPPORTED

    if cfg.resume is not None and engine not in SUPPORTED:
        raise ValueError(
            f"resume: checkpoints are not supported for engine={engine!r} yet (supported: "
            f"{list(SUPPORTED)}); drop --resume or use one of those engines"
        )
    model = _engine_model(engine, model, wrapped)
    path = resolve_resume(cfg, engine)
    if path is None:
        rank, _ = _world()
        root = Path(cfg.output_dir) / "checkpoints" if cfg.output_dir else None
        if rank == 0 and cfg.resume is None and root is not None and list_checkpoints(root):
            logger.info(f"note: {root} holds checkpoints of an earlier run; this run starts "
                        "from step 0 (pass --resume auto to continue it)")  # fmt: skip
        return TrainState(step=0, tokens=0, val_loss=float("nan"))
    state = load(path, engine=engine, model=model, optimizer=optimizer, ds_engine=ds_engine)
    if state.data_state is not None and hasattr(train_data, "load_state_dict"):
        train_data.load_state_dict(state.data_state)
    return state


def maybe_save(
    cfg: TrainConfig,
    step: int,
    tokens: int,
    val_loss: float,
    *,
    engine: str,
    model: torch.nn.Module,
    optimizer: Any,
    ds_engine: Any = None,
    train_data: Any = None,
    wrapped: Any = None,
) -> Path | None:
    """Save after optimizer step ``step`` when it is a checkpoint step (every
    ``checkpoint_every`` steps, and the last step) and the run has an ``output_dir``. Engines
    without checkpoint support are skipped with a note (once)."""
    from frugal_dist.train.checkpoint_engines import SUPPORTED

    if cfg.output_dir is None:
        return None
    if engine not in SUPPORTED:
        if not _NOTED and _world()[0] == 0:
            logger.info(f"note: no checkpoints for engine={engine!r} (supported: "
                        f"{list(SUPPORTED)})")  # fmt: skip
        _NOTED.append(engine)
        return None
    model = _engine_model(engine, model, wrapped)
    every = cfg.checkpoint_every
    if step != cfg.max_steps and not (every > 0 and step % every == 0):
        return None
    data_state = train_data.state_dict() if hasattr(train_data, "state_dict") else None
    state = TrainState(step=step, tokens=tokens, val_loss=val_loss, data_state=data_state)
    return save(Path(cfg.output_dir) / "checkpoints", state, cfg=cfg, engine=engine, model=model,
                optimizer=optimizer, ds_engine=ds_engine)  # fmt: skip
