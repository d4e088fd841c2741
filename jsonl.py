"""JSONL in and out: records read and validated (a JSONL file or a JSON array of objects, as
datasets ship), errors that name the file and line, and the files a run writes: atomic
writes (a temporary file of a fresh name, then a rename: never a half-written output) and
nothing written through a link planted where a run writes (refuse_link, open_own)."""

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from common import InputError

CONVERT = (
    "python -c \"import pandas as pd; pd.read_{fmt}('{path}').to_json('{stem}.jsonl', "
    "orient='records', lines=True, force_ascii=False)\""
)


def checked_path(path):
    """An input file that exists and is in a format read here, else an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    fmt = {".csv": "csv", ".tsv": "csv", ".xlsx": "excel"}.get(path.suffix.lower())
    if fmt:
        raise InputError(
            f"{path}: {path.suffix} is not read here; convert it to JSONL first, e.g. "
            + CONVERT.format(fmt=fmt, path=path, stem=path.with_suffix(""))
        )
    return path


def parse_json(text, where):
    """One JSON value, or an InputError naming `where` (malformed, or nested too deeply to read)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # what json raises besides: an integer of more than 4,300 digits
        raise InputError(f"{where}: JSON that cannot be read ({e})") from None


def stream_jsonl(path):
    """(line number, "file:line", record) for each non-blank line of a JSONL file, one line in
    memory at a time; every record must be a JSON object."""
    path = checked_path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 (byte {e.start + 1} of the line)") from None
            if line.strip():
                rec = parse_json(line, f"{path}:{n}")
                if not isinstance(rec, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
                yield n, f"{path}:{n}", rec


def read_jsonl(path, required=(), allow_empty=False):
    """Read records from a JSONL file or a JSON array of objects (as datasets ship), as a list
    of (number, location, record): number is the line (JSONL) or the 1-based index (array),
    location what an error names ("file:3" or "file: record 3"). Every record must be a JSON
    object holding the `required` keys; blank lines are skipped."""
    if is_datasets_folder(path) or Path(path).suffix.lower() == ".parquet":
        rows = read_columnar(Path(path))
    else:
        path = checked_path(path)
        with open(path, "rb") as f:
            array = f.read(4096).lstrip()[:1] == b"["
        rows = read_json_array(path, path.read_bytes()) if array else list(stream_jsonl(path))
    for n, where, rec in rows:
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise InputError(f"{where}: missing field {missing[0]!r} (keys present: {sorted(rec)})")
    if not rows and not allow_empty:
        raise InputError(f"{path}: empty file (no records)")
    return rows


def is_datasets_folder(path):
    """A folder written by the datasets library's save_to_disk."""
    return Path(path).is_dir() and (Path(path) / "dataset_info.json").is_file()


def read_columnar(path):
    """The rows of a Parquet file (with pyarrow) or of a `datasets` folder (save_to_disk, with
    datasets), as read_jsonl gives them: (n, "file: row n", record). The package is imported
    only here, and only when such an input is given; it is not a requirement."""
    package = "datasets" if path.is_dir() else "pyarrow"
    try:
        if package == "datasets":
            import datasets

            table = datasets.load_from_disk(str(path))
            rows = list(table["train"] if isinstance(table, datasets.DatasetDict) else table)
        else:
            import pyarrow.parquet

            if not path.is_file():
                raise InputError(f"{path}: no such file")
            rows = pyarrow.parquet.read_table(path).to_pylist()
    except ModuleNotFoundError:
        raise InputError(
            f"{path}: reading it needs the package {package} (pip install {package}), which this "
            "project does not require; or convert it to JSONL"
        ) from None
    except InputError:
        raise
    except Exception as e:  # pyarrow's and datasets' own errors for a file they cannot read
        raise InputError(f"{path}: cannot be read as {package} data ({type(e).__name__}: {e})") from None
    return [(n, f"{path}: row {n}", rec) for n, rec in enumerate(rows, 1)]


def read_json_array(path, data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start + 1})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise InputError(f"{path}: JSON that cannot be read ({e})") from None
    return [(n, f"{path}: record {n}", rec) for n, rec in enumerate(items, 1)]


def check_conversation(where, messages, field="prompt"):
    """A conversation given as a prompt: {role, content} messages of the known roles, a system
    message only first, the last a user turn (the one the answer answers)."""
    if not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise InputError(f"{where}: {field} must be a string or a list of {{role, content}} messages")
    roles = [m["role"] for m in messages]
    unknown = sorted(set(roles) - {"system", "user", "assistant"})
    if unknown:
        raise InputError(
            f"{where}: {field} has messages of unknown role {unknown[0]!r} (known: system, user, assistant)"
        )
    if "system" in roles[1:]:
        raise InputError(f"{where}: {field} has a system message after its first message")
    if roles[-1] != "user":
        raise InputError(
            f"{where}: {field} must end with a user message (the answer answers it), ends with {roles[-1]!r}"
        )


def claim_id(where, rec, seen):
    """Check that rec's id (already a string) is new, and remember it."""
    if rec["id"] in seen:
        raise InputError(f"{where}: duplicate id {rec['id']!r}")
    seen.add(rec["id"])


def first_if_list(value):
    """JailbreakTrigger's label is a one-element list, MT-Bench's turns a list of user turns:
    the first element stands for the whole."""
    return value[0] if isinstance(value, list) and value else value


def read_prompts(path, prompt_field=None, limit=None, id_field="id", category_field="category"):
    """A prompt set (JSONL or a JSON array) -> records with a string `id` (from id_field; the
    line or record number if absent), `prompt` (from `prompt`, `instruction`, `question` or
    MT-Bench's `turns` (the first turn), or from `prompt_field`) and, where the record has
    category_field, `category` (a list's first element)."""
    fields = [prompt_field] if prompt_field else ["prompt", "instruction", "question", "turns"]
    out, seen = [], set()
    for n, where, rec in read_jsonl(path):
        field = next((f for f in fields if f in rec), None)
        if field is None:
            raise InputError(
                f"{where}: no prompt field (looked for {', '.join(fields)}; "
                f"keys present: {sorted(rec)}); use --prompt-field"
            )
        prompt = first_if_list(rec[field]) if field == "turns" else rec[field]
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            check_conversation(where, prompt, field)  # a conversation to answer: its last user turn
        elif not isinstance(prompt, str) or not prompt.strip():
            raise InputError(
                f"{where}: field {field!r} must be a non-empty string or a list of messages ending "
                f"with a user turn, got {type(rec[field]).__name__}"
            )
        rec = dict(rec, id=str(first_if_list(rec.get(id_field, n))), prompt=prompt)
        if category_field in rec:
            rec["category"] = first_if_list(rec[category_field])
        claim_id(where, rec, seen)
        out.append(rec)
        if limit and len(out) >= limit:
            break
    return out


def read_records(path, required, limit=None, stage_hint=""):
    """Read the output of an earlier stage: records with a unique `id` (read as a string)
    and the `required` keys."""
    rows = read_jsonl(path)
    seen = set()
    for _, where, rec in rows:
        for k in ("id", "prompt", *required):
            if k not in rec:
                hint = f" ({stage_hint})" if stage_hint else ""
                raise InputError(f"{where}: missing field {k!r}{hint}; keys present: {sorted(rec)}")
        rec["id"] = str(rec["id"])
        claim_id(where, rec, seen)
    recs = [rec for _, _, rec in rows]
    return recs[:limit] if limit else recs


def refuse_link(path):
    """Refuse to write at `path` when a link is there: a symbolic link, or a file with another
    name (a hard link), so that nothing a run writes lands in a file it did not make."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise InputError(
            f"{path}: is a symbolic link, where this run writes; it writes through no link: move the "
            "link away or choose another --output"
        )
    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
        raise InputError(
            f"{path}: is a hard link (the file has {st.st_nlink} names), where this run writes; it "
            "writes into no file that has other names: move it away or choose another --output"
        )


OPEN_FLAGS = {
    "wb": os.O_WRONLY | os.O_CREAT,
    "r+b": os.O_RDWR,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "rw": os.O_RDWR | os.O_CREAT,
}


def open_fd(path, mode):
    """os.open of a file this run writes (mode a key of OPEN_FLAGS; "wb" truncates), never through
    a link: refuse_link first, then O_NOFOLLOW and a check of the opened file's names, which
    close the gap between the two. Returns the descriptor."""
    refuse_link(path)
    try:
        fd = os.open(path, OPEN_FLAGS[mode] | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == 40:  # ELOOP: a symbolic link appeared after the check
            refuse_link(path)
        raise
    if os.fstat(fd).st_nlink > 1:
        os.close(fd)
        refuse_link(path)
    if mode == "wb":
        os.ftruncate(fd, 0)  # only once the file is known to be this run's alone
    return fd


def open_own(path, mode):
    """open() for a file this run writes, through no link (open_fd)."""
    return os.fdopen(open_fd(path, mode), "a+b" if mode == "rw" else mode)


def fresh_dir(path):
    """An empty folder at `path` for this run to fill (a checkpoint or a model being written),
    never a link: what was there is removed if it is a folder, refused if it is a link."""
    path = Path(path)
    refuse_link(path)
    if path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_atomic(path, text):
    """Write text to path through a temporary file of a fresh name beside it (created anew, so no
    planted file or link is written through), then a rename: never a half-written file; a link
    at path itself is replaced, its target untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
