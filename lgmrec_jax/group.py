"""A grid's group: K configs of one program trained through the loop by the group engine, each with a
single run's files in its own workdir and the group's stacked state checkpointed in the group's
directory (:class:`GroupStore`), so a killed group resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Optional

import jax

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import distributed, loop, records
from lgmrec_jax.data import Dataset
from lgmrec_jax.group_engine import PER_CONFIG_KEYS, GroupEngine, GroupError, program_key, uniform_values
from lgmrec_jax.loop import ConfigProgress, Member
from lgmrec_jax.workdir import Workdir, run_identity, versions

__all__ = ["GroupError", "GroupOptions", "Member", "train_group"]


@dataclasses.dataclass
class GroupOptions:
    """How a group is trained (the grid's flags)."""

    n_devices: int = 1  # configs are spread over this many local devices
    repack: bool = True  # fewer slots once half the configs have finished (not under "map")
    eval_chunk: Optional[int] = None  # configs evaluated at once (vmap); None: group_engine.auto_eval_chunk
    batching: str = "map"  # group_engine.BATCHINGS
    stop_after_epochs: Optional[int] = None  # end this call early (tests of resume)
    checksums: Optional[dict] = None  # the dataset's checksums, when the caller has them already
    on_epoch: Optional[Callable[[dict], None]] = None  # called with each epoch's timings


def read_final_summary(workdir: str) -> Optional[dict]:
    """A config's summary.json when it records a final status (records.FINAL_STATUSES), else None."""
    summary = records.read_summary(os.path.join(workdir, "summary.json"))
    return summary if summary and summary.get("status") in records.FINAL_STATUSES else None


def refuse_other_length(member: Member, summary: Optional[dict]) -> None:
    """A finished config whose run length disagrees with its config's epochs is refused (GroupError),
    since its files would then describe another run than its config.json says: one that reached
    max_epochs below ``epochs`` (a group is not extended once every member has finished; a single run
    is), or one longer than ``epochs`` (a run is not shortened)."""
    if not summary:
        return
    ran, epochs = summary.get("epochs_run", 0), member.cfg.epochs
    if ran > epochs or summary.get("status") == "max_epochs" and ran < epochs:
        raise GroupError(f"config {member.cid} finished after {ran} epochs ({summary.get('status')}), and asks "
                         f"for epochs={epochs}: a finished group is neither extended nor shortened; rerun with "
                         f"epochs={ran}, or use --restart (or another --workdir) to train it again")


class GroupStore:
    """The group's checkpoints: the stacked states of its slots, and in the JSON block
    ``{"epoch", "slots", "configs": {cid: ConfigProgress}}``."""

    def __init__(self, group_dir: str, keep: int):
        self.checkpoints = ckpt_lib.Checkpoints(os.path.join(group_dir, "checkpoints"), keep, keep_best=False)

    def restore(self, engine: GroupEngine, known: set):
        """(states, slots, {cid: ConfigProgress}, epoch) from the newest readable checkpoint, or None."""
        import orbax.checkpoint as ocp

        checkpoints, skipped = self.checkpoints, []
        for step in reversed(checkpoints.steps()):
            try:
                meta = checkpoints.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                slots = meta["slots"]
                if not set(c for c in slots if c) <= known or not set(meta["configs"]) <= known:
                    raise GroupError("the checkpoint holds configs that are not members of this group")
                if len(slots) % engine.n_devices:
                    raise GroupError(f"the checkpoint has {len(slots)} slots, not a multiple of {engine.n_devices} "
                                     f"devices; rerun with the device count it was made with")
                state, _ = checkpoints.restore(step, engine.abstract_states(len(slots)))
            except Exception as err:  # an unreadable or foreign checkpoint: try an older one
                logging.warning("group checkpoint %d in %s cannot be restored: %s", step, checkpoints.directory,
                                str(err).splitlines()[0] if str(err) else type(err).__name__)
                skipped.append(step)
                continue
            progress = {cid: ConfigProgress(**p) for cid, p in meta["configs"].items()}
            logging.info("resumed group %s at epoch %d", checkpoints.directory, meta["epoch"])
            return engine.put(state), slots, progress, int(meta["epoch"])
        if skipped:
            raise GroupError(f"{checkpoints.directory}: no group checkpoint can be restored (tried {skipped}); "
                             f"rerun with --restart")
        return None

    def save(self, epoch: int, states, slots: list, progress: dict, valid_value) -> None:
        self.checkpoints.save(epoch, states, {"epoch": epoch, "slots": slots, "configs": progress}, None)

    def kept(self, epoch: int):
        return None, None  # the group's checkpoint moves on with its other configs

    def close(self) -> None:
        self.checkpoints.close()


def train_group(members: list[Member], ds: Dataset, group_dir: str,
                options: Optional[GroupOptions] = None) -> dict:
    """Trains (or resumes) every unfinished member; returns {cid: summary} ({"status": "interrupted"}
    for members left unfinished by ``options.stop_after_epochs``)."""
    if not members:
        return {}
    options = options or GroupOptions()
    if len({program_key(m.cfg) for m in members}) != 1:
        raise GroupError("members of a group must differ only in " + ", ".join(PER_CONFIG_KEYS))
    checksums = ds.checksums() if options.checksums is None else options.checksums
    workdirs = {m.cid: Workdir(m.workdir) for m in members}
    locked = []
    try:
        for m in members:
            workdirs[m.cid].prepare(run_identity(m.cfg, ds, checksums), restart=False)
            locked.append(workdirs[m.cid])
        # A group belongs to this process alone, also under jax.distributed (the grid shards configs).
        with distributed.process_local(), jax.default_matmul_precision(members[0].cfg.matmul_precision):
            return _train(members, ds, group_dir, options, checksums)
    finally:
        for wd in locked:
            wd.unlock()


def _train(members: list[Member], ds: Dataset, group_dir: str, options: GroupOptions, checksums: dict) -> dict:
    started = time.time()
    by_id = {m.cid: m for m in members}
    summaries = {m.cid: read_final_summary(m.workdir) for m in members}
    for m in members:
        refuse_other_length(m, summaries[m.cid])
    if all(summaries.values()):
        return summaries  # every member finished in an earlier call
    cfg0 = members[0].cfg
    engine = GroupEngine(cfg0, ds, options.n_devices, options.eval_chunk, batching=options.batching,
                         uniform=uniform_values([m.cfg for m in members]))
    store = GroupStore(group_dir, cfg0.keep_checkpoints)
    try:
        restored = store.restore(engine, set(by_id))
        if restored is None:
            todo = [m.cid for m in members if summaries[m.cid] is None]
            slots = loop.padded(todo, options.n_devices)
            progress = {cid: ConfigProgress() for cid in todo}
            epoch = 0
            states = engine.init([by_id[c or todo[0]].cfg.seed for c in slots])
        else:
            states, slots, progress, epoch = restored
        runs = {cid: loop.ConfigRun(by_id[cid], ds, p, started) for cid, p in progress.items()}
        done = {cid: s for cid, s in summaries.items() if s is not None}
        for cid, run in runs.items():
            if cid not in done:
                run.write_config(run_identity(run.cfg, ds, checksums), versions())
        opts = loop.LoopOptions(stop_after_epochs=options.stop_after_epochs,
                                repack=options.repack and options.batching != "map",  # under map a finished config costs nothing
                                name=os.path.basename(group_dir), on_epoch=options.on_epoch)
        results = loop.train(engine, runs, slots, states, epoch, store, opts, summaries=done)
        return {m.cid: results.get(m.cid, summaries[m.cid]) for m in members}
    finally:
        store.close()
