"""The output of a generation stage: resumable after a crash, shared by N ranks, one writer.

Every rank appends the records it makes to its own part file beside the output
(`OUT.part0`, `OUT.part1`, ..., flushed per batch). When all ranks are done, rank 0
merges the parts into OUT in input order (line i answers input record i), atomically, and
removes them. Rerun the same command after a crash (of any rank, at any world size) and
every record already in OUT or in a part counts as done; a torn last line is redone.

`OUT.run.json` records the settings that shape the records (the model's weights and the
prompt files among them) and a fingerprint of each input record: a rerun with other settings
or a changed input record is refused, naming what differs, instead of mixing two runs in one
file. `OUT.lock` keeps a second run out. No file the run reads may be one of these.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
from pathlib import Path

import common
import jsonl
import distributed


def fingerprint(record):
    return hashlib.sha1(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def complete_records(path):
    """(records, bytes of complete lines) of a JSONL file; a torn last line is left out."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    out = []
    for n, line in enumerate(data[:keep].decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except (ValueError, RecursionError):  # malformed, a huge integer, nested too deep
                raise common.InputError(
                    f"{path}:{n}: existing output is corrupt (malformed JSON); fix it or rerun with --overwrite"
                ) from None
    return out, keep


def lock(lock_path, what):
    """One writer at a time: rank 0 takes an advisory lock on lock_path (held until release()
    or the process ends); if another run holds it, every rank raises, naming the holder.
    Returns the lock (None on the other ranks)."""
    held, error = None, None
    if distributed.is_main():
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = jsonl.open_fd(lock_path, "rw")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            held = (fd, lock_path)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            error = f"{what}: another run is writing this output ({holder}); wait for it or use another --output"
    error = distributed.first_error(error)
    if error:
        release(held)
        raise common.InputError(error)
    return held


@contextlib.contextmanager
def one_writer(output):
    """with one_writer(OUT): ... : the same one-writer lock as the generation stages (OUT.lock),
    for a stage that writes OUT in one go (denoise, pairs, report, soup), so no two runs write
    one output at once, whichever stages they are."""
    output = Path(output)
    held = lock(output.with_name(output.name + ".lock"), output)
    try:
        yield
    finally:
        release(held)


def release(held):
    """Give a lock back (and remove its file)."""
    if held:
        fd, lock_path = held
        lock_path.unlink(missing_ok=True)
        os.close(fd)


NOT_FLAGS = {
    "weights": "the model's files",
    "inference": "the inference path (device, SPA_CPU_SPEED)",
    "prompts": "the files of prompts/",
    "models": "the models (--model, --baseline, their names and files)",
}


def setting_name(key):
    """How a resume error names a setting: as its flag, or as what a fingerprint stands for."""
    for k, what in NOT_FLAGS.items():
        if key in (k, f"judge_{k}"):
            return what.replace("the model", "the judge") if key.startswith("judge_") else what
    return "--" + key.replace("_", "-")


class Output:
    """with Output(path, inputs, settings, overwrite) as out: for batch in out.batches(B): out.write(...)

    inputs: the records (input order) the output answers, each with a unique string `id`.
    settings: a JSON-able dict of the flags that shape the records (checked on resume).
    On a clean exit the parts are merged; `out.new` counts this rank's records."""

    def __init__(self, path, inputs, settings, overwrite=False, reads=()):
        self.path, self.inputs, self.new = Path(path), inputs, 0
        if self.path.is_dir():
            raise common.InputError(f"{self.path}: --output is a directory; it must be a file")
        self.meta = self.path.with_name(self.path.name + ".run.json")
        side = [self.meta, self.path.with_name(self.path.name + ".lock")]
        common.refuse_overlap(
            reads,
            [self.path, *side, *(p.with_name(p.name + ".tmp") for p in (self.path, self.meta))],
            writes_like=self.part_name,
        )
        self.lock = lock(self.path.with_name(self.path.name + ".lock"), self.path)
        try:
            error = self._check_or_start(settings, overwrite) if distributed.is_main() else None
            error = distributed.first_error(error)
            if error:
                raise common.InputError(error)
            distributed.barrier()  # rank 0 has cleared or checked what is there
            self.done = self._read_done()
            self.pending = [r for r in inputs if r["id"] not in self.done]
            part = self.part(distributed.RANK)
            keep = complete_records(part)[1] if part.exists() else 0
            distributed.barrier()  # every rank has read every part before anyone appends
            self.f = jsonl.open_own(part, "r+b" if part.exists() else "wb")
            self.f.truncate(keep)
            self.f.seek(keep)
        except BaseException:
            self._release()
            raise

    @property
    def part_name(self):
        """The names of the part files: OUT.part0, OUT.part1, ... and nothing else."""
        return re.compile(re.escape(self.path.name) + r"\.part(0|[1-9][0-9]*)")  # part0, part1, ...: not part00

    def part(self, rank):
        return self.path.with_name(f"{self.path.name}.part{rank}")

    def _parts(self):
        folder = self.path.parent
        return sorted(p for p in folder.iterdir() if self.part_name.fullmatch(p.name)) if folder.is_dir() else []

    def _check_or_start(self, settings, overwrite):
        """Rank 0: with --overwrite remove the old output; otherwise refuse a resume with other
        settings or changed input records. Then record this run's settings and fingerprints."""
        settings = json.loads(json.dumps(settings))  # compared as they read back (tuples are lists)
        if self._parts() and not self.meta.exists():  # not provably a run's: never removed, not even by --overwrite
            return (
                f"{self._parts()[0]}: named like a part file of --output {self.path}, with no {self.meta.name} "
                "saying a run of this output wrote it; move it away or choose another --output"
            )
        if overwrite:
            for p in [self.path, *self._parts()]:
                p.unlink(missing_ok=True)
        fps = {r["id"]: fingerprint(r) for r in self.inputs}
        old = json.loads(self.meta.read_text()) if self.meta.exists() and not overwrite else None
        if old is None and not overwrite and self.path.exists():
            return (
                f"{self.path}: exists but has no {self.meta.name} saying how it was made; "
                "rerun with --overwrite (which replaces it) or use another --output"
            )
        if old is not None:
            differ = sorted(
                k for k in set(settings) | set(old["settings"]) if settings.get(k) != old["settings"].get(k)
            )
            if differ:
                was = ", ".join(
                    f"{setting_name(k)} {old['settings'].get(k)!r} (now {settings.get(k)!r})" for k in differ
                )
                return (
                    f"{self.path}: was made with {was}; rerun with the same settings, "
                    "or use --overwrite or another --output"
                )
            fps = {**old["inputs"], **fps}
            changed = [i for i, f in old["inputs"].items() if i in fps and fps[i] != f]
            if changed:
                return (
                    f"{self.path}: input record(s) {', '.join(changed[:5])} changed since the output was "
                    "started; use --overwrite or another --output"
                )
        jsonl.write_atomic(self.meta, json.dumps({"settings": settings, "inputs": fps}, ensure_ascii=False) + "\n")
        return None

    def _existing(self):
        """(file, record) for every complete record in OUT and in every part."""
        for p in [self.path, *self._parts()]:
            if p.exists():
                for rec in complete_records(p)[0]:
                    yield p, rec

    def _read_done(self):
        """Ids of the records in OUT and in every part (complete lines), checked against the input."""
        ids = {r["id"] for r in self.inputs}
        done = set()
        for p, rec in self._existing():
            if str(rec.get("id")) not in ids:
                raise common.InputError(
                    f"{p}: holds id {rec.get('id')!r}, which is not in this input; use another --output or --overwrite"
                )
            done.add(str(rec["id"]))
        return done

    def batches(self, batch_size, key="prompt", where=None):
        """This rank's batches of the pending records: sorted by len(record[key]) so batches
        waste little padding, cut into batches, dealt to ranks in turn. A batch's members do
        not depend on the number of ranks."""
        todo = sorted((r for r in self.pending if where is None or where(r)), key=lambda r: len(r[key]))
        return distributed.share([todo[i : i + batch_size] for i in range(0, len(todo), batch_size)])

    def write(self, records):
        for rec in records:
            self.f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            self.new += 1
        self.f.flush()
        os.fsync(self.f.fileno())

    def merge(self):
        """Rank 0: every record of OUT and of the parts, in input order, into OUT; parts removed."""
        by_id = {}
        for _, rec in self._existing():
            by_id.setdefault(str(rec["id"]), rec)
        missing = [r["id"] for r in self.inputs if r["id"] not in by_id]
        if missing:
            raise common.InputError(f"{self.path}: records {missing[:5]} are missing after every rank finished")
        jsonl.write_jsonl_atomic(self.path, [by_id[r["id"]] for r in self.inputs])
        for p in self._parts():
            p.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.f.close()
        if exc_type is None:
            distributed.barrier()  # every rank has written its share
            if distributed.is_main():
                self.merge()
            distributed.barrier()
        self._release()

    def _release(self):
        release(self.lock)
        self.lock = None
